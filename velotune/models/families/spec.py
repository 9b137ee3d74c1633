"""FamilySpec: how one model family maps onto the decoder."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from velotune.models.config import ModelConfig


@dataclass(frozen=True)
class FamilySpec:
    """Config translation both ways (HF config.json, GGUF metadata) and the family's GGUF architecture name."""

    name: str
    model_types: tuple[str, ...]
    from_hf: Callable[[dict[str, Any]], ModelConfig]
    to_hf: Callable[[ModelConfig], dict[str, Any]]
    from_gguf: Callable[[dict[str, Any]], ModelConfig] | None = None
    gguf_arch: str | None = None
    gguf_permute_qk: bool = False  # llama.cpp stores q/k rows of `llama` models interleaved
    default_template: str | None = None
