"""GGUF import: llama.cpp files (any quant type the `gguf` package can dequantize) into velotune's decoder.

Tensor names come from gguf's own HF<->GGUF name map, applied to the family's checkpoint layout (Phi-3's fused
qkv/gate_up, split again on load). Per family, llama.cpp's storage conventions are undone: q/k rows of `llama` files
are un-permuted back to Hugging Face's rotate-half layout, Gemma norm weights lose the 1 that llama.cpp adds.
Longrope factors (Phi-3) and llama3 rope divisors (rope_freqs, Llama 3.1+), stored as tensors, are read into the
metadata; the latter become the llama3 rope_scaling that reproduces them.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from velotune.errors import ModelLoadError
from velotune.models.decoder import CausalLM
from velotune.models.families import family_for_gguf
from velotune.models.gguf_reader import GGUFFile, read_gguf

_TOKEN_KEYS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "padding_token_id": "pad_token_id"}
_META_TENSORS = {
    "rope_factors_long.weight": "rope_factors_long",
    "rope_factors_short.weight": "rope_factors_short",
    "rope_freqs.weight": "rope_freqs",  # Llama 3.1+: llama3 rope scaling as per-frequency divisors
}


def read_metadata(file: GGUFFile) -> tuple[str, dict[str, Any]]:
    """(architecture, {key without the `<arch>.` prefix: value}) plus vocab_size, tied and token ids."""
    fields = file.fields
    if "general.architecture" not in fields:
        raise ModelLoadError(f"{file.path}: GGUF file has no general.architecture key")
    arch = fields["general.architecture"]
    meta: dict[str, Any] = {}
    for key, value in fields.items():
        if key.startswith(arch + "."):
            meta[key[len(arch) + 1 :]] = value
    for gguf_key, ours in _TOKEN_KEYS.items():
        if f"tokenizer.ggml.{gguf_key}" in fields:
            meta[ours] = int(fields[f"tokenizer.ggml.{gguf_key}"])
    if "vocab_size" not in meta:
        meta["vocab_size"] = len(fields.get("tokenizer.ggml.tokens", ()))
    names = {t.name for t in file.tensors}
    meta["tied"] = "output.weight" not in names
    for t in file.tensors:
        if t.name in _META_TENSORS:
            meta[_META_TENSORS[t.name]] = t.as_float32().tolist()
    return arch, meta


def open_gguf(path: Path) -> GGUFFile:
    """read_gguf with its ValueError / OSError as one ModelLoadError naming the file."""
    try:
        return read_gguf(path)
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({exc})") from exc


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row interleave: [heads, half, 2, ...] -> [heads, 2, half, ...]."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _name_map(arch: str, hf_names: Iterable[str], num_layers: int) -> dict[str, str]:
    """GGUF tensor name -> HF name, for every name of `hf_names` (a checkpoint's layout)."""
    import gguf

    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    tmap = gguf.get_tensor_name_map(arch_enum, num_layers)
    out = {}
    for name in hf_names:
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is not None:
            out[gname] = name
    return out


def load_gguf(
    path: Path, dtype: torch.dtype, device: torch.device | str = "cpu", hook: Any = None, progress: bool = True
) -> CausalLM:
    """Build the decoder for a GGUF file and fill it with its dequantized tensors."""
    from tqdm.auto import tqdm

    from velotune.models.load import build_empty, load_weights

    reader = open_gguf(path)
    arch, meta = read_metadata(reader)
    spec = family_for_gguf(arch)
    cfg = spec.from_gguf(meta)
    model = build_empty(cfg)
    names = _name_map(arch, spec.fuse(cfg, model.state_dict()), cfg.num_layers)  # fuse: checkpoint layout names

    def tensors() -> Any:
        for t in tqdm(reader.tensors, desc=f"loading {path.name}", unit="tensor", leave=False, disable=not progress):
            if t.name in _META_TENSORS:
                continue
            name = names.get(t.name, t.name)
            arr = t.dequantize()
            if spec.gguf_norm_offset and name.endswith("norm.weight"):
                arr = arr - spec.gguf_norm_offset
            if spec.gguf_permute_qk and name.endswith("self_attn.q_proj.weight"):
                arr = unpermute_qk(arr, cfg.num_heads)
            elif spec.gguf_permute_qk and name.endswith("self_attn.k_proj.weight"):
                arr = unpermute_qk(arr, cfg.num_kv_heads)
            yield name, torch.from_numpy(np.array(arr, dtype=np.float32))

    load_weights(model, tensors(), str(path), dtype, device, hook)
    return model
