"""Gated activations (SwiGLU, GeGLU): the Triton kernels against the PyTorch references."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.compare import assert_matches, grads
from velotune.kernels.glu import geglu, geglu_reference, glu_backward, swiglu, swiglu_reference

DTYPES = [torch.float32, torch.bfloat16]
SHAPES = [(5, 123, 123), (2, 3, 14336), (1, 1), (3, 1000)]
OPS = {"swiglu": (swiglu, swiglu_reference), "geglu": (geglu, geglu_reference)}


def test_cpu_takes_the_reference():
    g, u = torch.randn(4, 9), torch.randn(4, 9)
    assert torch.equal(swiglu(g, u), swiglu_reference(g, u)) and torch.equal(geglu(g, u), geglu_reference(g, u))


@pytest.mark.gpu
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_triton_matches_reference(triton_device, shape, dtype, op):
    torch.manual_seed(0)
    fused, reference = OPS[op]
    gate = (3 * torch.randn(shape, device=triton_device)).to(dtype).requires_grad_()  # reaches both tails
    up = torch.randn(shape, device=triton_device, dtype=dtype, requires_grad=True)
    dh = torch.randn_like(up)
    out, ref = fused(gate, up), reference(gate, up)
    assert type(out.grad_fn).__name__ == "GLUFunctionBackward"  # the Triton path ran
    assert_matches(out, ref)
    for got, want in zip(grads((out * dh).sum(), gate, up), grads((ref * dh).sum(), gate, up), strict=True):
        assert_matches(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize("gelu", [False, True])
def test_backward_rebuilds_output_and_can_write_gate_grad_over_its_input(triton_device, gelu):
    torch.manual_seed(0)
    gate, up, dh = (torch.randn(7, 300, device=triton_device) for _ in range(3))
    dg, du, h = glu_backward(dh.clone(), gate, up, gelu, store_h=True)
    dh_owned = dh.clone()
    dg2, du2, _ = glu_backward(dh_owned, gate, up, gelu, dg_into_dh=True)
    assert dg2.data_ptr() == dh_owned.data_ptr()
    assert torch.equal(dg2, dg) and torch.equal(du2, du)
    reference = geglu_reference if gelu else swiglu_reference
    assert_matches(h, reference(gate, up))
