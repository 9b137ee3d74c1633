"""Saving for the FastLanguageModel API: adapter, merged 16-bit model, GGUF + Modelfile, and hub uploads.

Every export is written into a staging directory beside the destination, reloaded with velotune's own loaders
and checked against the in-memory model (velotune.compat.export_check); only files that pass are moved into the
destination, whose other files are left alone. The training model is never modified: merging happens on a
shallow copy that shares its tensors. Uploads first confirm the hub is reachable with a valid token, then build
and check the export locally, then push it in one commit, so an offline machine gets one message and nothing is
written or uploaded.
"""

from __future__ import annotations

import copy
import itertools
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from velotune.compat.chat_templates import end_of_turn_token
from velotune.compat.export_check import (
    TOLERANCE_KL,
    check_gguf_tokens,
    check_merged_stop,
    check_tokenizer_dir,
    compare_logprobs,
    make_probe,
)
from velotune.compat.hf_model import VelotuneForCausalLM
from velotune.errors import ConfigError, ExportError
from velotune.export.gguf import QUANT_TYPES, export_gguf
from velotune.export.hf import save_hf
from velotune.export.modelfile import STYLES, detect_style, write_modelfile
from velotune.lora.apply import merge_lora
from velotune.lora.peft_format import save_adapter
from velotune.models.decoder import CausalLM
from velotune.models.frozen import FrozenQuantLinear
from velotune.models.load import load_model

SAVE_METHODS = ("merged_16bit", "lora")
GGUF_ALIASES = {"not_quantized": "f16", "fast_quantized": "q8_0", "quantized": "q4_k_m"}
_IGNORED_SAVE_ARGS = ("maximum_memory_usage", "temporary_location", "max_shard_size", "tags", "first_conversion")


def _check_args(kwargs: dict[str, Any], where: str) -> None:
    if kwargs.get("push_to_hub"):
        raise ConfigError(f"{where}(push_to_hub=True) is not supported; use the matching push_to_hub_* method")
    if kwargs.get("safe_serialization") is False:
        raise ConfigError("velotune writes safetensors only; drop safe_serialization=False")
    unknown = sorted(set(kwargs) - {"push_to_hub", "safe_serialization", "is_main_process", *_IGNORED_SAVE_ARGS})
    if unknown:
        raise ConfigError(f"{where}() got unexpected arguments {unknown}")


@contextmanager
def _staging(dest: Path) -> Iterator[Path]:
    """A fresh directory beside `dest` (same filesystem), removed afterwards whatever happens."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into(src: Path, dest: Path) -> None:
    """Move every file of `src` into `dest`, replacing same-named files and keeping the others."""
    dest.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        target = dest / f.name
        if target.is_dir() and f.is_dir():
            _move_into(f, target)
            continue
        if target.is_dir():
            shutil.rmtree(target)
        f.replace(target)


def _dequantize_linears(model: nn.Module) -> None:
    """Replace every quantized linear (FrozenQuantLinear) by an nn.Linear holding its weights."""
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, FrozenQuantLinear):
            continue
        weight = mod.dequantize()
        lin = nn.Linear(
            mod.in_features, mod.out_features, bias=mod.bias is not None, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            lin.weight.copy_(weight)
            if mod.bias is not None:
                lin.bias.copy_(mod.bias)
        lin.requires_grad_(False)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, lin)


def merged_copy(lm: CausalLM) -> CausalLM:
    """A CausalLM with LoRA merged and quantized linears dequantized, sharing all other tensors with `lm`."""
    memo = {id(t): t for t in itertools.chain(lm.parameters(), lm.buffers())}
    shadow = copy.deepcopy(lm, memo)  # new module objects, the same tensors
    merge_lora(shadow)
    _dequantize_linears(shadow)
    return shadow


def _stop_ids(wrapper: VelotuneForCausalLM, tokenizer: Any, end_of_turn: int | None) -> list[int]:
    """EOS ids an export must stop at: the model's, the tokenizer's and the chat template's end of turn."""
    eos = wrapper.model.config.eos_token_id
    ids = [eos] if isinstance(eos, int) else list(eos or [])
    for extra in (tokenizer.eos_token_id, end_of_turn):
        if extra is not None and extra not in ids:
            ids.append(extra)
    return ids


def _write_stop_ids(model_dir: Path, stop_ids: list[int], pad_id: int | None) -> None:
    """config.json's eos_token_id and a generation_config.json, so transformers' generate stops at a reply's end."""
    cfg_path = model_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["eos_token_id"] = stop_ids[0] if len(stop_ids) == 1 else stop_ids
    cfg_path.write_text(json.dumps(cfg, indent=2))
    gen = {"bos_token_id": cfg.get("bos_token_id"), "eos_token_id": cfg["eos_token_id"], "pad_token_id": pad_id}
    (model_dir / "generation_config.json").write_text(json.dumps(gen, indent=2))


def _export_dtype(lm: CausalLM, sixteen_bit: bool) -> torch.dtype:
    """The model's float16 / bfloat16 (its quantized layers compute in it too); float32 models give bfloat16 for a
    16-bit export and float32 as GGUF input (the GGUF writer then rounds once)."""
    if lm.dtype in (torch.float16, torch.bfloat16):
        return lm.dtype
    return torch.bfloat16 if sixteen_bit else torch.float32


def _write_merged(
    wrapper: VelotuneForCausalLM, tokenizer: Any, out: Path, dtype: torch.dtype, stop_ids: list[int]
) -> None:
    save_hf(merged_copy(wrapper.model), tokenizer, out, dtype=dtype)
    _write_stop_ids(out, stop_ids, tokenizer.pad_token_id)


def _reload(path: Path, lm: CausalLM) -> CausalLM:
    dtype = _export_dtype(lm, sixteen_bit=True) if lm.device.type == "cuda" else torch.float32
    model, _ = load_model(path, dtype=dtype, device=lm.device, with_tokenizer=False)
    return model


def save_adapter_or_model(wrapper: VelotuneForCausalLM, save_directory: str | Path) -> Path:
    """The PEFT adapter of a LoRA model, else the whole model in Hugging Face layout (quantized layers 16-bit)."""
    dest = Path(save_directory)
    with _staging(dest) as tmp:
        if wrapper.has_lora:
            save_adapter(wrapper.model, tmp, base_model=wrapper.model.source)
        else:
            dtype = wrapper.model.dtype
            save_hf(merged_copy(wrapper.model), None, tmp / "m", dtype=dtype)
            tmp = tmp / "m"
        _move_into(tmp, dest)
    return dest


def save_merged(
    wrapper: VelotuneForCausalLM,
    save_directory: str | Path,
    tokenizer: Any,
    save_method: str = "merged_16bit",
    check: bool = True,
    **kwargs: Any,
) -> Path:
    """save_method "merged_16bit": merged weights in 16-bit + tokenizer, reloaded and checked; "lora": the adapter
    + tokenizer."""
    _check_args(kwargs, "save_pretrained_merged")
    if save_method not in SAVE_METHODS:
        hint = " (velotune writes 4-bit models as GGUF: save_pretrained_gguf)" if "4bit" in save_method else ""
        raise ConfigError(f"save_method={save_method!r} is not supported; use one of {', '.join(SAVE_METHODS)}{hint}")
    if not kwargs.get("is_main_process", True):
        return Path(save_directory)
    dest = Path(save_directory)
    if save_method == "lora":
        if not wrapper.has_lora:
            raise ConfigError("save_method='lora' needs a model with LoRA adapters (FastLanguageModel.get_peft_model)")
        save_adapter_or_model(wrapper, dest)
        tokenizer.save_pretrained(str(dest))
        return dest
    end_of_turn = end_of_turn_token(tokenizer)
    stop_ids = _stop_ids(wrapper, tokenizer, end_of_turn)
    with _staging(dest) as tmp:
        out = tmp / "merged"
        _write_merged(wrapper, tokenizer, out, _export_dtype(wrapper.model, sixteen_bit=True), stop_ids)
        if check:
            probe = make_probe(wrapper.model, tokenizer, stop_ids)
            what = f"merged model {dest}"
            compare_logprobs(probe, _reload(out, wrapper.model), what, TOLERANCE_KL["merged_16bit"], tokenizer)
            check_tokenizer_dir(probe, out, what)
            if end_of_turn is not None:
                check_merged_stop(out, end_of_turn, tokenizer)
        _move_into(out, dest)
    return dest


def _modelfile_template(tokenizer: Any) -> str | None:
    """The chat template for the Modelfile; None (Ollama reads the one stored in the GGUF) for unknown styles."""
    template = getattr(tokenizer, "chat_template", None) or None
    try:
        return None if template is None else (detect_style(template) and template)
    except ExportError:
        return None


def gguf_methods(quantization_method: str | list[str]) -> list[str]:
    """Normalised GGUF types: lower case, aliases resolved, each one velotune can write."""
    methods = [quantization_method] if isinstance(quantization_method, str) else list(quantization_method)
    out = []
    for m in methods:
        key = GGUF_ALIASES.get(m.lower(), m.lower())
        if key not in QUANT_TYPES:
            raise ConfigError(
                f"quantization_method {m!r} is not supported; use one of {', '.join(QUANT_TYPES)} "
                f"(or {', '.join(GGUF_ALIASES)})"
            )
        if key not in out:
            out.append(key)
    if not out:
        raise ConfigError("quantization_method is empty; pass e.g. 'q8_0' or ['q4_k_m', 'q8_0']")
    return out


def save_gguf(
    wrapper: VelotuneForCausalLM,
    save_directory: str | Path,
    tokenizer: Any,
    quantization_method: str | list[str] = "q8_0",
    check: bool = True,
    workers: int = 1,
    **kwargs: Any,
) -> list[Path]:
    """One GGUF per quantization method, named <dir>/<dir name>.<TYPE>.gguf, and a Modelfile for the first.

    The merged model is written to a staging directory in Hugging Face layout, exported by velotune's GGUF writer,
    each file reloaded with velotune's GGUF importer and checked. `workers` > 1 quantizes in spawned processes,
    which needs the calling script to run under `if __name__ == "__main__":`.
    """
    _check_args(kwargs, "save_pretrained_gguf")
    methods = gguf_methods(quantization_method)
    dest = Path(save_directory)
    if not kwargs.get("is_main_process", True):
        return [dest / f"{dest.name}.{m.upper()}.gguf" for m in methods]
    end_of_turn = end_of_turn_token(tokenizer)
    stop_ids = _stop_ids(wrapper, tokenizer, end_of_turn)
    template = _modelfile_template(tokenizer)
    stop_strings = [tokenizer.convert_ids_to_tokens(end_of_turn)] if end_of_turn is not None else []
    if template is not None:
        stop_strings += list(STYLES[detect_style(template)].stops)
    probe = make_probe(wrapper.model, tokenizer, stop_ids) if check else None
    with _staging(dest) as tmp:
        hf_dir = tmp / "merged"
        _write_merged(wrapper, tokenizer, hf_dir, _export_dtype(wrapper.model, sixteen_bit=False), stop_ids)
        out_dir = tmp / "out"
        files = []
        for m in methods:
            path = export_gguf(hf_dir, out_dir / f"{dest.name}.{m.upper()}.gguf", m, workers=workers)
            if probe is not None:
                what = f"GGUF {m} export {dest / path.name}"
                compare_logprobs(probe, _reload(path, wrapper.model), what, TOLERANCE_KL[m], tokenizer)
                if end_of_turn is not None:
                    check_gguf_tokens(probe, path, tokenizer, end_of_turn, stop_strings)
            files.append(dest / path.name)
        extra_stops = stop_strings[:1] if stop_strings else []
        write_modelfile(out_dir / files[0].name, template, extra_stops)
        _move_into(out_dir, dest)
    return files


# ---- hub ----------------------------------------------------------------------------------------------------


def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub import errors

    return (OSError, getattr(errors, "HTTPError", OSError), errors.HfHubHTTPError)


def _hub_api(repo_id: str, token: str | None) -> Any:
    """An HfApi whose token the hub accepts; ExportError (nothing written) when offline or not logged in."""
    try:
        from huggingface_hub import HfApi
    except ImportError as exc:
        raise ExportError("pushing to the hub needs huggingface_hub: pip install 'velotune[hub]'") from exc
    api = HfApi(token=token)
    try:
        api.whoami()
    except _hub_errors() as exc:
        raise ExportError(
            f"cannot push to {repo_id}: the Hugging Face hub is unreachable or the token is missing or invalid "
            f"({type(exc).__name__}: {str(exc)[:200]}). Nothing was written or uploaded; save locally "
            "(save_pretrained / save_pretrained_merged / save_pretrained_gguf) and upload when online"
        ) from exc
    return api


def _upload(api: Any, repo_id: str, folder: Path, private: bool | None, message: str) -> str:
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=message)
    except _hub_errors() as exc:
        raise ExportError(
            f"upload to {repo_id} failed ({type(exc).__name__}: {str(exc)[:200]}); the upload is one "
            "commit, so the repository holds nothing of it"
        ) from exc
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")


def push_adapter(
    wrapper: VelotuneForCausalLM,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload adapter (velotune)",
    **kwargs: Any,
) -> str:
    _check_args(kwargs, "push_to_hub")
    api = _hub_api(repo_id, token)
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter_or_model(wrapper, Path(tmp) / "up")
        return _upload(api, repo_id, Path(tmp) / "up", private, commit_message)


def push_merged(
    wrapper: VelotuneForCausalLM,
    repo_id: str,
    tokenizer: Any,
    save_method: str = "merged_16bit",
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload merged model (velotune)",
    **kwargs: Any,
) -> str:
    api = _hub_api(repo_id, token)
    with tempfile.TemporaryDirectory() as tmp:
        save_merged(wrapper, Path(tmp) / "up", tokenizer, save_method=save_method, **kwargs)
        return _upload(api, repo_id, Path(tmp) / "up", private, commit_message)


def push_gguf(
    wrapper: VelotuneForCausalLM,
    repo_id: str,
    tokenizer: Any,
    quantization_method: str | list[str] = "q8_0",
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload GGUF (velotune)",
    **kwargs: Any,
) -> str:
    gguf_methods(quantization_method)  # argument errors before any network or disk work
    api = _hub_api(repo_id, token)
    with tempfile.TemporaryDirectory() as tmp:
        save_gguf(wrapper, Path(tmp) / "up", tokenizer, quantization_method=quantization_method, **kwargs)
        return _upload(api, repo_id, Path(tmp) / "up", private, commit_message)
