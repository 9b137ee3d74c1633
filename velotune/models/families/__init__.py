"""Registry of decoder families: Hugging Face `model_type` / GGUF `general.architecture` -> FamilySpec.

A new family is one module with a FamilySpec, added to `_SPECS`.
"""

from __future__ import annotations

import torch

from velotune.errors import UnsupportedArchitectureError
from velotune.models.config import ModelConfig
from velotune.models.families import gemma, granite, llama, mistral, phi3, qwen2, qwen3
from velotune.models.families.spec import FamilySpec

_SPECS: tuple[FamilySpec, ...] = (
    llama.SPEC,
    mistral.SPEC,
    qwen2.SPEC,
    qwen3.SPEC,
    gemma.GEMMA2,
    gemma.GEMMA3,
    phi3.SPEC,
    granite.SPEC,
)

FAMILIES: dict[str, FamilySpec] = {t: s for s in _SPECS for t in s.model_types}
GGUF_ARCHS: dict[str, FamilySpec] = {s.gguf_arch: s for s in _SPECS if s.gguf_arch and s.from_gguf}


def family_for(model_type: str) -> FamilySpec:
    """The family of a Hugging Face `model_type`; a clear error listing the supported ones otherwise."""
    if model_type not in FAMILIES:
        raise UnsupportedArchitectureError(
            f"model_type {model_type!r} is not supported by velotune; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[model_type]


def family_for_gguf(arch: str) -> FamilySpec:
    """The family of a GGUF `general.architecture`."""
    if arch not in GGUF_ARCHS:
        raise UnsupportedArchitectureError(
            f"GGUF architecture {arch!r} is not supported by velotune; supported: {', '.join(sorted(GGUF_ARCHS))}"
        )
    return GGUF_ARCHS[arch]


def check_dtype(cfg: ModelConfig, dtype: torch.dtype) -> None:
    """ConfigError when `cfg`'s family cannot compute in `dtype` (Gemma in float16)."""
    family_for(cfg.model_type).check_dtype(cfg, dtype)
