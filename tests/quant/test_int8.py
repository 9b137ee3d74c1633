"""Int8 row-wise weight storage and Linear8bit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from velotune.errors import QuantizationError
from velotune.quant.int8 import Linear8bit, dequantize_int8, quantize_int8


def _layer(in_features=96, out_features=40, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


@pytest.mark.parametrize("shape", [(40, 96), (7, 13), (1, 1)])
def test_int8_is_rowwise_absmax_rounding(shape):
    torch.manual_seed(0)
    w = torch.randn(shape)
    q, scb = quantize_int8(w)
    absmax = w.abs().amax(1)
    assert q.dtype == torch.int8 and scb.dtype == torch.float32
    assert torch.equal(scb, absmax)
    assert torch.equal(q, torch.round(w / absmax[:, None] * 127).to(torch.int8))
    err = (dequantize_int8(q, scb, torch.float32) - w).abs()
    assert (err <= absmax[:, None] / 254 * (1 + 1e-5)).all()  # half a quantization step per row


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_int8_matches_bitsandbytes_vectorwise_quant(dtype):
    bF = pytest.importorskip("bitsandbytes.functional", reason="pip install '.[test]' brings bitsandbytes")
    torch.manual_seed(1)
    w = torch.randn(64, 200, dtype=dtype)
    q, scb = quantize_int8(w)
    q_bnb, scb_bnb, _ = bF.int8_vectorwise_quant(w)
    assert torch.equal(scb, scb_bnb)
    assert torch.equal(q, q_bnb)


def test_int8_zero_row_stays_zero():
    w = torch.randn(3, 8)
    w[1] = 0
    q, scb = quantize_int8(w)
    out = dequantize_int8(q, scb, torch.float32)
    assert torch.isfinite(out).all() and (out[1] == 0).all()


def test_linear8bit_forward_close_to_float_linear():
    linear = _layer()
    q = Linear8bit.from_linear(linear, compute_dtype=torch.float32)
    x = torch.randn(2, 5, 96)
    torch.testing.assert_close(q(x), F.linear(x, q.dequantize(), q.bias), rtol=1e-6, atol=1e-6)
    ref = linear(x)
    assert ((q(x) - ref).norm() / ref.norm()).item() < 0.01  # measured 0.004


def test_linear8bit_backward_gives_input_grad_of_dequantized_linear():
    q = Linear8bit.from_linear(_layer(bias=False), compute_dtype=torch.float32)
    x = torch.randn(4, 96, requires_grad=True)
    g = torch.randn(4, 40)
    q(x).backward(g)
    torch.testing.assert_close(x.grad, g @ q.dequantize(), rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in q.parameters())


def test_linear8bit_state_dict_uses_bitsandbytes_names_and_keeps_scale_float32():
    q = Linear8bit.from_linear(_layer(), compute_dtype=torch.bfloat16)
    q.half()
    assert {k: v.dtype for k, v in q.state_dict().items()} == {
        "weight": torch.int8,
        "SCB": torch.float32,
        "bias": torch.float16,
    }
    assert q(torch.randn(2, 96)).dtype == torch.float32


def test_linear8bit_rejects_mismatched_tensors():
    with pytest.raises(QuantizationError, match=r"int8 weight \[out, in\] and SCB \[out\]"):
        Linear8bit(torch.zeros(4, 8, dtype=torch.int8), torch.ones(5))
