"""Rotary embedding applied to q and k (rotate-half layout, as in Hugging Face checkpoints).

Partial rotary: only the first cos.shape[-1] channels of each head rotate. The PyTorch reference is the CPU path.
"""

from __future__ import annotations

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos, sin [B, T, R] with R <= D. Returns the rotated x."""
    rot = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, R]
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, Hq, T, D] and k [B, Hk, T, D] by position tables cos/sin [B, T, R]."""
    return rope_reference(q, cos, sin), rope_reference(k, cos, sin)
