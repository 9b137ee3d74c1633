"""FamilySpec: how one model family maps onto the decoder."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from velotune.errors import ConfigError
from velotune.models.config import ModelConfig

# (cfg, checkpoint name, tensor) -> the decoder's (name, tensor) pairs; e.g. Phi-3's qkv_proj -> q/k/v_proj
SplitWeights = Callable[[ModelConfig, str, torch.Tensor], list[tuple[str, torch.Tensor]]]
# (cfg, decoder state dict) -> checkpoint-layout state dict; the inverse of SplitWeights
FuseWeights = Callable[[ModelConfig, dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class FamilySpec:
    """Config translation both ways (HF config.json, GGUF metadata), the family's GGUF architecture name, and the
    checkpoint facts the loader and exporter need (fused projections, llama.cpp's norm and q/k conventions)."""

    name: str
    model_types: tuple[str, ...]
    from_hf: Callable[[dict[str, Any]], ModelConfig]
    to_hf: Callable[[ModelConfig], dict[str, Any]]
    from_gguf: Callable[[dict[str, Any]], ModelConfig] | None = None
    gguf_arch: str | None = None
    gguf_permute_qk: bool = False  # llama.cpp stores q/k rows of `llama` models interleaved
    gguf_norm_offset: float = 0.0  # llama.cpp stores Gemma norm weights as (offset + w)
    default_template: str | None = None
    split_weights: SplitWeights | None = None  # checkpoints with fused projections (Phi-3)
    fuse_weights: FuseWeights | None = None
    float16_safe: bool = True  # False: activations overflow float16 (Gemma); train in bfloat16 or float32

    def split(
        self, cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]]
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Checkpoint tensors in the decoder's layout (fused projections split), one at a time."""
        for name, tensor in tensors:
            yield from self.split_weights(cfg, name, tensor) if self.split_weights else ((name, tensor),)

    def fuse(self, cfg: ModelConfig, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The decoder's state dict in the checkpoint layout transformers loads (identity for most families)."""
        return self.fuse_weights(cfg, state_dict) if self.fuse_weights else state_dict

    def check_dtype(self, cfg: ModelConfig, dtype: torch.dtype) -> None:
        """ConfigError for a compute dtype this family cannot run in (Gemma overflows float16)."""
        if dtype == torch.float16 and not self.float16_safe:
            raise ConfigError(
                f"{cfg.model_type} models overflow in float16 (their activations exceed its range and turn into "
                "inf/NaN); use dtype bfloat16 (or float32 on hardware without bfloat16)"
            )
