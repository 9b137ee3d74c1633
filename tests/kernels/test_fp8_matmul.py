"""FP8 matmuls: the Triton block kernel and torch._scaled_mm (per channel) against the reference, both directions."""

from __future__ import annotations

import pytest
import torch

from velotune.kernels.fp8_matmul import (
    dequantize_fp8,
    fp8_block_grad_matmul_triton,
    fp8_block_matmul_triton,
    fp8_capable,
    fp8_grad_matmul,
    fp8_grad_matmul_reference,
    fp8_matmul,
    fp8_matmul_reference,
)
from velotune.quant.fp8 import quantize_fp8

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="FP8 matmuls need a CUDA GPU")
SHAPES = [(1, 128, 128), (37, 300, 200), (64, 4096, 1024), (33, 1000, 257)]  # (tokens, in, out)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _operands(n, k, m, device, granularity):
    torch.manual_seed(0)
    q, s, block = quantize_fp8(torch.randn(m, k, device=device) * 0.02, granularity)
    x = torch.randn(n, k, device=device, dtype=torch.bfloat16)
    dy = torch.randn(n, m, device=device, dtype=torch.bfloat16)
    return x, dy, q, s, block


def test_cpu_takes_the_reference():
    x, dy, q, s, block = _operands(5, 96, 40, "cpu", "channel")
    assert torch.equal(fp8_matmul(x, q, s, block), fp8_matmul_reference(x, q, s, block))
    assert torch.equal(fp8_grad_matmul(dy, q, s, block), fp8_grad_matmul_reference(dy, q, s, block))


@pytest.mark.gpu  # deselected by default (pyproject addopts); run with -m gpu, or TRITON_INTERPRET=1 on CPU
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_block_kernel_matches_reference(triton_device, shape):
    """bf16 outputs: the kernel accumulates in fp32 and rounds once; the reference rounds its dequantized operands to
    bf16 first, so allow 1% relative (bf16's step is 0.4%)."""
    x, dy, q, s, block = _operands(*shape, triton_device, "block")
    y = fp8_block_matmul_triton(x, q, s)
    dx = fp8_block_grad_matmul_triton(dy, q, s)
    assert y.dtype == dx.dtype == torch.bfloat16
    assert _rel(y, fp8_matmul_reference(x.float(), q, s, block)) < 0.01
    assert _rel(dx, fp8_grad_matmul_reference(dy.float(), q, s, block)) < 0.01


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("granularity", ["channel", "block"])
@pytest.mark.parametrize("shape", SHAPES)
def test_cuda_fp8_path_matches_reference(shape, granularity):
    """On a GPU of compute capability >= 8.9: _scaled_mm (per channel) or the Triton kernel (block) against the
    reference, forward and backward, bf16 (1% relative)."""
    if not fp8_capable(torch.device("cuda")):
        pytest.skip("needs compute capability 8.9+")
    x, dy, q, s, block = _operands(*shape, "cuda", granularity)
    y, dx = fp8_matmul(x, q, s, block), fp8_grad_matmul(dy, q, s, block)
    assert _rel(y, fp8_matmul_reference(x.float(), q, s, block)) < 0.01
    assert _rel(dx, fp8_grad_matmul_reference(dy.float(), q, s, block)) < 0.01
    ref = x.float() @ dequantize_fp8(q, s, block, torch.float32).t()
    assert _rel(y, ref) < 0.06  # activation quantization only (measured ~0.037 on CPU)
