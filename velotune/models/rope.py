"""Rotary position embedding tables: inverse frequencies (with Llama-3 / linear scaling) and cos/sin per position."""

from __future__ import annotations

import math

import torch

from velotune.errors import ConfigError
from velotune.models.config import ModelConfig


def _llama3_scale(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor = s["factor"]
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _linear_scale(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    return inv_freq / s["factor"]


ROPE_SCALINGS = {"llama3": _llama3_scale, "linear": _linear_scale, "default": lambda f, s: f}


def rotary_dim(cfg: ModelConfig) -> int:
    return int(cfg.head_dim * cfg.partial_rotary_factor)


def inv_frequencies(cfg: ModelConfig, theta: float | None = None) -> torch.Tensor:
    """[rotary_dim / 2] float32 inverse frequencies, scaled as the config asks."""
    dim = rotary_dim(cfg)
    base = cfg.rope_theta if theta is None else theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_SCALINGS:
        raise ConfigError(f"rope scaling {kind!r} is not supported; supported: {', '.join(sorted(ROPE_SCALINGS))}")
    return ROPE_SCALINGS[kind](inv_freq, scaling)


def rope_tables(
    inv_freq: torch.Tensor, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [B, T, rotary_dim] for positions [B, T] (HF's rotate-half layout)."""
    freqs = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # [B, T, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, dim]
    return emb.cos().to(dtype), emb.sin().to(dtype)
