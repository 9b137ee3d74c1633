"""RMSNorm: the Triton kernel against the PyTorch reference (output, input grad, weight grad)."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.compare import assert_matches, grads
from velotune.kernels.rms_norm import rms_norm, rms_norm_reference

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(5, 123, 123), (2, 3, 4096), (1, 1, 3), (7, 96)]


def test_cpu_takes_the_reference():
    x, w = torch.randn(3, 5, 16, requires_grad=True), torch.randn(16, requires_grad=True)
    y = rms_norm(x, w, 1e-6, 1.0)
    assert torch.equal(y, rms_norm_reference(x, w, 1e-6, 1.0))
    assert "RMSNormFunction" not in type(y.grad_fn).__name__


def _check(x: torch.Tensor, weight: torch.Tensor, offset: float, dtype: torch.dtype) -> None:
    dy = torch.randn_like(x)
    y = rms_norm(x, weight, 1e-6, offset)
    assert type(y.grad_fn).__name__ == "RMSNormFunctionBackward"  # the Triton path ran
    ref = rms_norm_reference(x, weight, 1e-6, offset)
    assert_matches(y, ref)
    for got, want in zip(grads((y * dy).sum(), x, weight), grads((ref * dy).sum(), x, weight), strict=True):
        if want is None:
            assert got is None
        else:
            assert_matches(got, want, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("train_weight", [True, False])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(triton_device, shape, dtype, offset, train_weight):
    torch.manual_seed(0)
    x = torch.randn(shape, device=triton_device, dtype=dtype, requires_grad=True)
    weight = (1 - offset + 0.1 * torch.randn(shape[-1], device=triton_device)).requires_grad_(train_weight)
    _check(x, weight, offset, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_triton_normalises_transposed_heads_in_place_layout(triton_device, head_dim, dtype):
    """q/k norms see [B, H, T, D] views of [B, T, H, D] projections; the output keeps that layout (no copy)."""
    torch.manual_seed(0)
    x = torch.randn(2, 9, 4, head_dim, device=triton_device, dtype=dtype).transpose(1, 2).requires_grad_()
    weight = torch.randn(head_dim, device=triton_device, dtype=dtype, requires_grad=True)
    assert rms_norm(x, weight, 1e-6).stride() == x.stride()
    _check(x, weight, 0.0, dtype)
