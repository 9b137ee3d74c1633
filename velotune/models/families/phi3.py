"""Phi-3 / Phi-3.5 / Phi-4 (dense, model_type phi3): Llama's math with fused projections in the checkpoint.

Checkpoints hold self_attn.qkv_proj (rows: q, then k, then v) and mlp.gate_up_proj (rows: gate, then up). The decoder
keeps q/k/v_proj and gate/up_proj apart, so LoRA targets and kernels are the same as every other family:
`split_weights` cuts the fused tensors on load and `fuse_weights` joins them again for a transformers-loadable
export. Rope: longrope ("su") with short/long factors (Phi-3 128k, Phi-3.5), partial rotary (Phi-4-mini: 0.75).
"""

from __future__ import annotations

from typing import Any

import torch

from velotune.errors import ModelLoadError
from velotune.models.config import ModelConfig
from velotune.models.families.common import common_from_gguf, common_from_hf, common_to_hf, rope_from_hf
from velotune.models.families.spec import FamilySpec

_FUSED = {  # checkpoint module -> the decoder's modules it holds, in row order
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def _rows(cfg: ModelConfig, fused: str) -> list[int]:
    if fused == "self_attn.qkv_proj":
        kv = cfg.num_kv_heads * cfg.head_dim
        return [cfg.num_heads * cfg.head_dim, kv, kv]
    return [cfg.intermediate_size, cfg.intermediate_size]


def split_weights(cfg: ModelConfig, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """qkv_proj -> q/k/v_proj and gate_up_proj -> gate/up_proj (weight [rows, in] or bias [rows]); others as is."""
    for fused, parts in _FUSED.items():
        prefix, sep, leaf = name.partition(f".{fused}.")
        if sep:
            rows = _rows(cfg, fused)
            if tensor.shape[0] != sum(rows):
                raise ModelLoadError(
                    f"{name}: {tensor.shape[0]} rows, expected {sum(rows)} ({' + '.join(map(str, rows))} for "
                    f"{', '.join(parts)}) for this config"
                )
            chunks = torch.split(tensor, rows, dim=0)
            return [(f"{prefix}.{part}.{leaf}", chunk) for part, chunk in zip(parts, chunks, strict=True)]
    return [(name, tensor)]


def fuse_weights(cfg: ModelConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of split_weights over a whole state dict (order of other keys kept)."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        for fused, parts in _FUSED.items():
            prefix, sep, leaf = name.partition(f".{parts[0]}.")
            if sep:
                out[f"{prefix}.{fused}.{leaf}"] = torch.cat([state_dict[f"{prefix}.{p}.{leaf}"] for p in parts])
                break
            if any(f".{p}." in name for p in parts[1:]):
                break  # joined with the first part
        else:
            out[name] = tensor
    return out


def rope_scaling_from_hf(c: dict[str, Any], scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    """Phi-3's rope_scaling as transformers reads it: "su" and "yarn" mean longrope, and a top-level
    original_max_position_embeddings wins over the one inside the dict."""
    if scaling is None:
        return None
    scaling = dict(scaling)
    if scaling.get("rope_type") in ("su", "yarn", "longrope"):
        scaling["rope_type"] = "longrope"
        if c.get("original_max_position_embeddings") is not None:
            scaling["original_max_position_embeddings"] = c["original_max_position_embeddings"]
    return scaling


def from_hf(c: dict[str, Any]) -> ModelConfig:
    scaling = rope_scaling_from_hf(c, rope_from_hf(c)[1])
    return common_from_hf(c, rope_scaling=scaling, sliding_window=c.get("sliding_window"), layer_types=None)


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    extra: dict[str, Any] = {"sliding_window": cfg.sliding_window, "partial_rotary_factor": cfg.partial_rotary_factor}
    if cfg.rope_scaling and "original_max_position_embeddings" in cfg.rope_scaling:
        extra["original_max_position_embeddings"] = cfg.rope_scaling["original_max_position_embeddings"]
    out = common_to_hf(cfg, "Phi3ForCausalLM", **extra)
    if "hf_config" not in cfg.extra:
        out.pop("head_dim")  # transformers' Phi-3 derives it from hidden_size / heads
    return out


def from_gguf(meta: dict[str, Any]) -> ModelConfig:
    """llama.cpp's phi3: longrope factors come as the rope_factors_short/long tensors (read into `meta`)."""
    scaling = None
    if "rope_factors_long" in meta:
        scaling = {
            "rope_type": "longrope",
            "short_factor": [float(x) for x in meta["rope_factors_short"]],
            "long_factor": [float(x) for x in meta["rope_factors_long"]],
            "original_max_position_embeddings": int(meta["rope.scaling.original_context_length"]),
        }
        if "rope.scaling.attn_factor" in meta:
            scaling["attention_factor"] = float(meta["rope.scaling.attn_factor"])
    window = meta.get("attention.sliding_window")
    return common_from_gguf(meta, "phi3", rope_scaling=scaling, sliding_window=int(window) if window else None)


SPEC = FamilySpec(
    name="phi3",
    model_types=("phi3",),
    from_hf=from_hf,
    to_hf=to_hf,
    from_gguf=from_gguf,
    gguf_arch="phi3",
    split_weights=split_weights,
    fuse_weights=fuse_weights,
    default_template="phi-3",
)
