"""Qwen3 (dense): RMSNorm per head on q and k before rope, an explicit head_dim (q_proj wider than hidden_size on
some sizes), no q/k/v bias unless attention_bias says so (then o_proj has one too, as in transformers)."""

from __future__ import annotations

from typing import Any

from velotune.models.config import ModelConfig
from velotune.models.families.common import common_from_gguf, common_from_hf, common_to_hf
from velotune.models.families.qwen2 import sliding_from_hf, sliding_to_hf
from velotune.models.families.spec import FamilySpec


def from_hf(c: dict[str, Any]) -> ModelConfig:
    window, types = sliding_from_hf(c)
    bias = c.get("attention_bias", False)
    return common_from_hf(
        c,
        head_dim=c.get("head_dim", 128),
        qk_norm=True,
        attention_bias=bias,
        o_bias=bias,
        sliding_window=window,
        layer_types=types,
    )


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return common_to_hf(cfg, "Qwen3ForCausalLM", attention_bias=cfg.attention_bias, **sliding_to_hf(cfg))


def from_gguf(meta: dict[str, Any]) -> ModelConfig:
    return common_from_gguf(meta, "qwen3", qk_norm=True)


SPEC = FamilySpec(
    name="qwen3",
    model_types=("qwen3",),
    from_hf=from_hf,
    to_hf=to_hf,
    from_gguf=from_gguf,
    gguf_arch="qwen3",
    default_template="chatml",
)
