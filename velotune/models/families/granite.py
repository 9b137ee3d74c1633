"""IBM Granite 3.x (dense): Llama's layout with four multipliers, each a field of the decoder's config: the
embeddings are multiplied by embedding_multiplier, attention scores use attention_multiplier as their scale, each
sublayer's output is multiplied by residual_multiplier before the residual add, and the logits are divided by
logits_scaling. llama.cpp has a `granite` architecture; velotune neither imports nor exports Granite GGUF files yet."""

from __future__ import annotations

from typing import Any

from velotune.models.config import ModelConfig
from velotune.models.families.common import common_from_hf, common_to_hf
from velotune.models.families.spec import FamilySpec


def from_hf(c: dict[str, Any]) -> ModelConfig:
    bias = c.get("attention_bias", False)
    return common_from_hf(
        c,
        attention_bias=bias,
        o_bias=bias,
        mlp_bias=c.get("mlp_bias", False),
        embedding_scale=c.get("embedding_multiplier", 1.0),
        query_pre_attn_scalar=c.get("attention_multiplier", 1.0) ** -2,  # scale = scalar ** -0.5
        residual_scale=c.get("residual_multiplier", 1.0),
        logit_scale=c.get("logits_scaling", 1.0),
    )


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return common_to_hf(
        cfg,
        "GraniteForCausalLM",
        attention_bias=cfg.attention_bias,
        mlp_bias=cfg.mlp_bias,
        embedding_multiplier=cfg.embedding_scale,
        attention_multiplier=cfg.query_pre_attn_scalar**-0.5,
        residual_multiplier=cfg.residual_scale,
        logits_scaling=cfg.logit_scale,
    )


SPEC = FamilySpec(
    name="granite",
    model_types=("granite",),
    from_hf=from_hf,
    to_hf=to_hf,
)
