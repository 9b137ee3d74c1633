"""Mistral (7B v0.1-v0.3, Nemo, Small): Llama's layout plus sliding-window attention on every layer when
config.sliding_window is set, and an explicit head_dim on some sizes. llama.cpp runs these as `llama` (no window),
so a Mistral GGUF file is imported by the llama family."""

from __future__ import annotations

from typing import Any

from velotune.models.config import ModelConfig
from velotune.models.families.common import common_from_hf, common_to_hf
from velotune.models.families.spec import FamilySpec


def from_hf(c: dict[str, Any]) -> ModelConfig:
    return common_from_hf(c, sliding_window=c.get("sliding_window"), layer_types=None)  # every layer, as transformers


def to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return common_to_hf(cfg, "MistralForCausalLM", sliding_window=cfg.sliding_window)


SPEC = FamilySpec(
    name="mistral",
    model_types=("mistral",),
    from_hf=from_hf,
    to_hf=to_hf,
    gguf_arch="llama",  # for export; import goes through the llama family
    gguf_permute_qk=True,
    default_template="mistral",
)
