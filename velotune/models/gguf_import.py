"""GGUF import: llama.cpp files (any quant type the `gguf` package can dequantize) into velotune's decoder.

Tensor names come from gguf's own HF<->GGUF name map; q/k rows of `llama`-architecture files are un-permuted
back to Hugging Face's rotate-half layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from velotune.errors import ModelLoadError
from velotune.models.decoder import CausalLM
from velotune.models.families import family_for_gguf

_TOKEN_KEYS = {"bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id", "padding_token_id": "pad_token_id"}


def read_metadata(reader: Any) -> tuple[str, dict[str, Any]]:
    """(architecture, {key without the `<arch>.` prefix: value}) plus vocab_size, tied and token ids."""
    fields = reader.fields
    if "general.architecture" not in fields:
        raise ModelLoadError("GGUF file has no general.architecture key")
    arch = fields["general.architecture"].contents()
    meta: dict[str, Any] = {}
    for key, field in fields.items():
        if key.startswith(arch + "."):
            meta[key[len(arch) + 1 :]] = field.contents()
    for gguf_key, ours in _TOKEN_KEYS.items():
        if f"tokenizer.ggml.{gguf_key}" in fields:
            meta[ours] = int(fields[f"tokenizer.ggml.{gguf_key}"].contents())
    if "vocab_size" not in meta:
        meta["vocab_size"] = len(fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    meta["tied"] = "output.weight" not in names
    return arch, meta


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row interleave: [heads, half, 2, ...] -> [heads, 2, half, ...]."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _name_map(arch: str, model: CausalLM) -> dict[str, str]:
    """GGUF tensor name -> our (HF) name, for every tensor of `model`."""
    import gguf

    arch_enum = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch]
    tmap = gguf.get_tensor_name_map(arch_enum, model.config.num_layers)
    out = {}
    for name in model.state_dict():
        gname = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if gname is not None:
            out[gname] = name
    return out


def load_gguf(path: Path, dtype: torch.dtype, device: torch.device | str = "cpu", hook: Any = None) -> CausalLM:
    """Build the decoder for a GGUF file and fill it with its dequantized tensors."""
    import gguf
    from tqdm.auto import tqdm

    from velotune.models.load import build_empty, load_weights

    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({exc})") from exc
    arch, meta = read_metadata(reader)
    spec = family_for_gguf(arch)
    cfg = spec.from_gguf(meta)
    model = build_empty(cfg)
    names = _name_map(arch, model)

    def tensors() -> Any:
        for t in tqdm(reader.tensors, desc=f"loading {path.name}", unit="tensor", leave=False):
            if t.name == "rope_freqs.weight":
                raise ModelLoadError(f"{path}: rope frequency factors (rope_freqs) are not supported yet")
            name = names.get(t.name, t.name)
            arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))
            if spec.gguf_permute_qk and name.endswith("self_attn.q_proj.weight"):
                arr = unpermute_qk(arr, cfg.num_heads)
            elif spec.gguf_permute_qk and name.endswith("self_attn.k_proj.weight"):
                arr = unpermute_qk(arr, cfg.num_kv_heads)
            yield name, torch.from_numpy(np.array(arr, dtype=np.float32))

    load_weights(model, tensors(), str(path), dtype, device, hook)
    return model
