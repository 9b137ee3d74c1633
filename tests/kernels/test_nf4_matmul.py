"""The NF4 GEMV for decode steps (kernels/nf4_matmul.py) against dequantize + matmul (CUDA only), and the dispatch:
CPU and many rows take the reference; Linear4bit and LoRA over a 4-bit base use the GEMV in decode."""

from __future__ import annotations

import pytest
import torch

from velotune.kernels.nf4_matmul import MAX_ROWS, fused_applies, nf4_matmul, nf4_matmul_reference
from velotune.lora.layers import LoRALinear
from velotune.quant.nf4 import Linear4bit, quantize

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernel needs a CUDA GPU")


def test_cpu_and_large_inputs_take_the_reference():
    nf4 = quantize(torch.randn(96, 128) * 0.02)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    assert not fused_applies(x, nf4)
    assert torch.equal(nf4_matmul(x, nf4), nf4_matmul_reference(x, nf4))
    layer = Linear4bit(nf4, compute_dtype=torch.bfloat16)
    with torch.no_grad():
        assert layer.small_matmul(x) is None  # CPU: no kernel, forward dequantizes as before
        torch.testing.assert_close(layer(x), x @ nf4.dequantize(torch.bfloat16).t())


@pytest.mark.gpu  # deselected by default (pyproject addopts); run with -m gpu
@cuda
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize(
    "rows, n, k", [(1, 4096, 4096), (5, 96, 256), (16, 14336, 4096), (8, 4096, 14336), (7, 33, 384), (3, 1024, 4096)]
)
@pytest.mark.parametrize("config", [None, (8, 1, 4, 3), (32, 4, 8, 1)])
def test_fused_matches_dequantize_then_matmul(rows, n, k, dtype, double_quant, blocksize, config):
    torch.manual_seed(0)
    nf4 = quantize(torch.randn(n, k, device="cuda") * 0.02, blocksize=blocksize, double_quant=double_quant)
    x = torch.randn(rows, k, device="cuda", dtype=dtype)
    assert fused_applies(x, nf4)
    assert not fused_applies(torch.randn(MAX_ROWS + 1, k, device="cuda", dtype=dtype), nf4)
    got = nf4_matmul(x, nf4, config)
    want = x.float() @ nf4.dequantize(torch.float32).t()  # the kernel computes in fp32, then rounds once
    assert got.shape == (rows, n) and got.dtype == dtype
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-3 * float(want.abs().max()))


@pytest.mark.gpu
@cuda
def test_linear4bit_and_lora_use_the_kernel_in_decode_and_match():
    torch.manual_seed(0)
    base = torch.nn.Linear(512, 384, bias=True, device="cuda")
    layer = Linear4bit.from_linear(base, compute_dtype=torch.bfloat16)
    lora = LoRALinear(layer, r=8, alpha=16)
    torch.nn.init.normal_(lora.lora_B, std=0.02)
    x = torch.randn(2, 3, 512, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert layer.small_matmul(x) is not None
        w = layer.dequantize(torch.bfloat16)
        want = x @ w.t() + layer.bias
        torch.testing.assert_close(layer(x), want, rtol=2e-2, atol=2e-2)
        delta = (x @ lora.lora_A.to(x.dtype).t() @ lora.lora_B.to(x.dtype).t()) * lora.scaling
        torch.testing.assert_close(lora(x), want + delta, rtol=2e-2, atol=2e-2)
    x.requires_grad_(True)
    y = lora(x)  # training: the grad path, same values
    y.sum().backward()
    assert lora.lora_A.grad is not None and x.grad is not None
