"""Scaled dot-product attention with the variants the decoder families need.

Causal attention without a mask goes to PyTorch SDPA's fused kernels (FlashAttention on CUDA). A boolean mask
(padding, packed sequences, sliding windows) goes to SDPA with that mask. Attention-logit soft-capping (Gemma 2)
is not expressible in SDPA, so it takes the explicit path below.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """q [B, Hq, Tq, D], k/v [B, Hk, Tk, D], mask [B, 1, Tq, Tk] bool (True = attend) -> [B, Hq, Tq, D]."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scale  # [B, Hq, Tq, Tk]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if causal:
        tq, tk = scores.shape[-2:]
        keep = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of q over k/v; `causal` applies the causal mask, `mask` any extra boolean mask."""
    if softcap is not None:
        return attention_reference(q, k, v, mask, causal, scale, softcap)
    gqa = q.shape[1] != k.shape[1]
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
