"""Llama family (Llama 2/3/3.1/3.2, DeepSeek-R1-Distill-Llama, SmolLM2): HF config and GGUF metadata <-> ModelConfig.

Llama 3.1+ scales rope with rope_type "llama3"; Llama 3.2 1B/3B tie the LM head to the embeddings.
"""

from __future__ import annotations

from typing import Any

from velotune.models.config import ModelConfig
from velotune.models.families.common import common_from_gguf, common_from_hf, common_to_hf
from velotune.models.families.spec import FamilySpec


def from_hf(c: dict[str, Any]) -> ModelConfig:
    bias = c.get("attention_bias", False)
    return common_from_hf(c, attention_bias=bias, o_bias=bias, mlp_bias=c.get("mlp_bias", False))


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return common_to_hf(cfg, "LlamaForCausalLM", attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)


def from_gguf(meta: dict[str, Any]) -> ModelConfig:
    """ModelConfig from GGUF key/values (keys without the `llama.` prefix, plus `vocab_size` and `tied`).

    llama.cpp runs Mistral 7B-style models as `llama` too; without sliding windows the math is the same.
    """
    return common_from_gguf(meta, "llama")


SPEC = FamilySpec(
    name="llama",
    model_types=("llama",),
    from_hf=from_hf,
    to_hf=to_hf,
    from_gguf=from_gguf,
    gguf_arch="llama",
    gguf_permute_qk=True,
    default_template="llama-3",
)
