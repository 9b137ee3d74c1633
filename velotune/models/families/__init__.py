"""Registry of decoder families: Hugging Face `model_type` / GGUF `general.architecture` -> FamilySpec."""

from __future__ import annotations

from velotune.errors import UnsupportedArchitectureError
from velotune.models.families import llama
from velotune.models.families.spec import FamilySpec

_SPECS: tuple[FamilySpec, ...] = (llama.SPEC,)

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
