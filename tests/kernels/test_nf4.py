"""NF4 dequantize: the Triton kernel against the torch reference (CUDA only), and the reference's decoding table."""

from __future__ import annotations

import pytest
import torch

from velotune.kernels.nf4 import _dequantize_nf4_triton, dequantize_nf4, dequantize_nf4_reference
from velotune.quant.nf4 import nf4_code, quantize

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton kernel needs a CUDA GPU")
SHAPES = [(1, 1), (3, 5), (33, 17), (64, 64), (40, 96), (257, 1000), (4096, 4097)]
# fp32: the kernel may fuse absmax * code + offset into one FMA, so allow a few ulp; 16-bit: one rounding step.
TOL = {torch.float32: (1e-6, 1e-7), torch.bfloat16: (1e-2, 1e-5), torch.float16: (1e-3, 1e-5)}


def test_reference_decodes_both_nibbles_of_every_byte():
    packed = torch.arange(256, dtype=torch.uint8).unsqueeze(1)  # [256, 1]: 512 values, 8 blocks of 64
    absmax = torch.linspace(0.5, 4.0, 8)
    out = dequantize_nf4_reference(packed, absmax, nf4_code(), (512,), torch.float32)
    code = nf4_code()
    expected = torch.stack([code[torch.arange(256) >> 4], code[torch.arange(256) & 15]], 1).reshape(-1)
    torch.testing.assert_close(out, expected * absmax.repeat_interleave(64), rtol=0, atol=0)


def test_cpu_tensors_use_the_reference():
    nf4 = quantize(torch.randn(33, 17))
    args = (nf4.packed, nf4.absmax, nf4.code, nf4.shape, torch.bfloat16)
    nested = dict(nested_absmax=nf4.nested_absmax, nested_code=nf4.nested_code, offset=nf4.offset)
    assert torch.equal(dequantize_nf4(*args, **nested), dequantize_nf4_reference(*args, **nested))


@pytest.mark.gpu  # deselected by default (pyproject addopts); run with -m gpu
@cuda
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(shape, dtype, double_quant):
    torch.manual_seed(0)
    nf4 = quantize(torch.randn(shape, device="cuda") * 0.02, double_quant=double_quant)
    args = (nf4.packed, nf4.absmax, nf4.code, nf4.shape, dtype, nf4.nested_absmax, nf4.nested_code, nf4.offset)
    out = _dequantize_nf4_triton(*args, 64, 256)
    ref = dequantize_nf4_reference(*args, 64, 256)
    assert out.shape == shape and out.dtype == dtype and out.is_cuda
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)
    assert torch.equal(dequantize_nf4(*args), out)  # the public op picks Triton on CUDA


@pytest.mark.gpu  # deselected by default (pyproject addopts); run with -m gpu
@cuda
@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_triton_matches_reference_for_other_blocksizes(blocksize):
    nf4 = quantize(torch.randn(100, 300, device="cuda"), blocksize=blocksize)
    args = (nf4.packed, nf4.absmax, nf4.code, nf4.shape, torch.float32, nf4.nested_absmax, nf4.nested_code, nf4.offset)
    torch.testing.assert_close(
        _dequantize_nf4_triton(*args, blocksize, 256),
        dequantize_nf4_reference(*args, blocksize, 256),
        rtol=1e-6,
        atol=1e-7,
    )
