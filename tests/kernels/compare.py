"""Comparing a kernel with its reference: dtype-aware tolerances and gradients of several tensors at once."""

from __future__ import annotations

import torch

# Relative tolerance per dtype; the absolute one scales with the reference's largest magnitude, since 16-bit
# results differ from a 16-bit reference by a rounding step of values near that size.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """out equals ref within the tolerance of `dtype` (default: ref's dtype)."""
    tol = TOL[dtype or ref.dtype]
    scale = (ref.detach().abs().max().item() if ref.numel() else 0.0) or 1.0
    assert out.shape == ref.shape and out.dtype == ref.dtype, (out.shape, out.dtype, ref.shape, ref.dtype)
    torch.testing.assert_close(out.detach().float(), ref.detach().float(), rtol=tol, atol=tol * scale)


def grads(loss: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor | None]:
    """d loss / d tensors (None for those that do not require grad)."""
    need = [t for t in tensors if t.requires_grad]
    got = iter(torch.autograd.grad(loss, need, retain_graph=True))  # inputs may share a graph (dropout)
    return [next(got) if t.requires_grad else None for t in tensors]
