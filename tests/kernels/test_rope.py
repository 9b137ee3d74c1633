"""Rotary embedding: the Triton kernel against the PyTorch reference, full and partial rotary, GQA head counts."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.compare import assert_matches, grads
from velotune.kernels.rope import apply_rope, rope_reference
from velotune.models.rope import rope_tables

DTYPES = [torch.float32, torch.bfloat16]
# (batch, q heads, kv heads, tokens, head_dim, rotary dim)
SHAPES = [(1, 4, 2, 7, 64, 64), (2, 32, 8, 5, 128, 128), (1, 3, 1, 9, 128, 64), (2, 4, 4, 3, 80, 32)]


def _tables(batch: int, tokens: int, rot: int, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rot, 2, device=device).float() / rot)
    positions = torch.randint(0, 4096, (batch, tokens), device=device)
    return rope_tables(inv_freq, positions, dtype)


def test_cpu_takes_the_reference():
    q, k = torch.randn(1, 4, 5, 16), torch.randn(1, 2, 5, 16)
    cos, sin = _tables(1, 5, 16, torch.float32, "cpu")
    out_q, out_k = apply_rope(q, k, cos, sin)
    assert torch.equal(out_q, rope_reference(q, cos, sin)) and torch.equal(out_k, rope_reference(k, cos, sin))


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    out_q, out_k = apply_rope(q, k, cos, sin)
    assert type(out_q.grad_fn).__name__ == "RopeFunctionBackward"  # the Triton path ran
    assert out_q.stride() == q.stride() and out_k.stride() == k.stride()
    ref_q, ref_k = rope_reference(q, cos, sin), rope_reference(k, cos, sin)
    assert_matches(out_q, ref_q)
    assert_matches(out_k, ref_k)
    got = grads((out_q * dq).sum() + (out_k * dk).sum(), q, k)
    want = grads((ref_q * dq).sum() + (ref_k * dk).sum(), q, k)
    for g, w in zip(got, want, strict=True):
        assert_matches(g, w)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference_on_projection_views(triton_device, shape, dtype):
    """q/k as the decoder makes them: [B, T, H, D] projections viewed as [B, H, T, D]."""
    torch.manual_seed(0)
    b, hq, hk, t, d, rot = shape
    q = torch.randn(b, t, hq, d, device=triton_device, dtype=dtype).transpose(1, 2).requires_grad_()
    k = torch.randn(b, t, hk, d, device=triton_device, dtype=dtype).transpose(1, 2).requires_grad_()
    _check(q, k, *_tables(b, t, rot, dtype, triton_device))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_matches_reference_on_contiguous_heads_and_shared_tables(triton_device, dtype):
    """Contiguous [B, H, T, D] inputs, and one position table [1, T, R] broadcast over the batch."""
    torch.manual_seed(0)
    q = torch.randn(3, 4, 6, 64, device=triton_device, dtype=dtype, requires_grad=True)
    k = torch.randn(3, 2, 6, 64, device=triton_device, dtype=dtype, requires_grad=True)
    _check(q, k, *_tables(1, 6, 64, dtype, triton_device))
