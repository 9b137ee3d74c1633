"""NF4 storage and Linear4bit: agreement with the format's spec (conftest.py) and with bitsandbytes, error, autograd."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from velotune.errors import QuantizationError
from velotune.quant.nf4 import Linear4bit, dynamic_code, nf4_code, quantize

SHAPES = [(64, 128), (40, 96), (33, 17), (7, 9), (1, 1), (3, 200)]  # incl. sizes that are not multiples of 64


def _bnb():
    return pytest.importorskip("bitsandbytes.functional", reason="pip install '.[test]' brings bitsandbytes")


def test_nf4_code_is_normalfloat_quantiles():
    # QLoRA's construction: 8 positive and 7 negative quantiles of N(0, 1), an exact zero, scaled to [-1, 1].
    offset = 0.9677083
    normal = torch.distributions.Normal(0.0, 1.0)
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    torch.testing.assert_close(nf4_code(), (v / v.abs().max()).float(), rtol=0, atol=1e-6)


def test_dynamic_code_is_the_spec_table(nf4_spec):
    code = dynamic_code()
    assert code.shape == (256,) and torch.equal(code, code.sort().values) and code.unique().numel() == 256
    assert code[-1] == 1.0 and (code == 0).sum() == 1
    assert np.array_equal(code.numpy(), nf4_spec.dynamic_code())


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_matches_per_block_spec_exactly(nf4_spec, shape, double_quant):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    ours = quantize(w, blocksize=64, double_quant=double_quant)
    spec = nf4_spec.quantize(w, blocksize=64, double_quant=double_quant)
    assert ours.packed.shape == ((w.numel() + 1) // 2, 1) and ours.packed.dtype == torch.uint8
    assert np.array_equal(ours.packed.reshape(-1).numpy(), spec["packed"])
    assert np.array_equal(ours.absmax.numpy(), spec["absmax"])
    if double_quant:
        assert np.array_equal(ours.nested_absmax.numpy(), spec["nested_absmax"])
        assert ours.offset.item() == spec["offset"]
    assert torch.equal(ours.dequantize(torch.float32), nf4_spec.dequantize(spec))
    assert ours.dequantize().shape == w.shape and ours.dequantize().dtype == w.dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(64, 128), (33, 17), (1, 1), (300, 257)])
def test_single_quant_is_bit_exact_with_bitsandbytes(shape, dtype):
    bF = _bnb()
    torch.manual_seed(1)
    w = torch.randn(shape, dtype=dtype)
    ours = quantize(w, 64, double_quant=False)
    packed, state = bF.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.absmax, state.absmax)
    assert torch.equal(ours.dequantize(dtype), bF.dequantize_4bit(packed, state))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(256, 512), (33, 17), (300, 257)])
def test_double_quant_matches_bitsandbytes(shape, dtype):
    """Packed codes, offset and nested absmax are bit-exact. bitsandbytes' CPU library picks the 8-bit absmax code
    with an approximate binary search, so about 0.2% of those codes differ from the nearest one (which we and
    bitsandbytes' torch backend pick); ours is never farther from the true absmax. Reading is bit-exact both ways."""
    bF = _bnb()
    torch.manual_seed(2)
    w = torch.randn(shape, dtype=dtype)
    ours = quantize(w, 64, double_quant=True)
    packed, state = bF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(ours.packed, packed)
    assert torch.equal(ours.offset, state.offset)
    assert torch.equal(ours.nested_absmax, state.state2.absmax)
    assert torch.equal(ours.nested_code, state.state2.code)
    true = bF.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")[1].absmax - state.offset
    group_absmax = ours.nested_absmax.repeat_interleave(256)[: true.numel()]
    err_ours = (ours.nested_code[ours.absmax.long()] * group_absmax - true).abs()
    err_bnb = (state.state2.code[state.absmax.long()] * group_absmax - true).abs()
    assert (err_ours <= err_bnb).all()
    if true.numel() > 1:  # a single block has absmax == offset exactly, and bnb's code for 0/0 is arbitrary
        assert (ours.absmax == state.absmax).float().mean() > 0.99
    # our reader on bnb's tensors, and bnb's reader on ours
    theirs = type(ours)(
        packed=packed,
        absmax=state.absmax,
        code=state.code,
        shape=state.shape,
        dtype=dtype,
        nested_absmax=state.state2.absmax,
        nested_code=state.state2.code,
        offset=state.offset,
    )
    assert torch.equal(theirs.dequantize(dtype), bF.dequantize_4bit(packed, state))
    state.absmax = ours.absmax
    assert torch.equal(ours.dequantize(dtype), bF.dequantize_4bit(ours.packed, state))


def test_nf4_error_on_gaussian_weights():
    """Regression guard, measured with this test's seed: N(0, 1) weights [1024, 1024], blocksize 64.
    RMSE 0.09197 single, 0.09200 double-quantized (relative 9.2%); max abs error 0.57 (in a block with absmax ~3.7)."""
    torch.manual_seed(0)
    w = torch.randn(1024, 1024)
    single = quantize(w, 64, double_quant=False).dequantize(torch.float32)
    double = quantize(w, 64, double_quant=True).dequantize(torch.float32)
    rmse_single = (single - w).pow(2).mean().sqrt().item()
    rmse_double = (double - w).pow(2).mean().sqrt().item()
    assert 0.090 < rmse_single < 0.094
    assert rmse_double < rmse_single * 1.002  # the 8-bit absmax costs almost nothing
    # each error is at most half the widest NF4 gap (-1 to -0.696) times its block's absmax; 8-bit absmax adds a bit
    absmax = w.reshape(-1, 64).abs().amax(1, keepdim=True)
    assert ((single - w).reshape(-1, 64).abs() / absmax).max() <= nf4_code().diff().max() / 2 + 1e-6
    assert ((double - w).reshape(-1, 64).abs() / absmax).max() < 0.17


def test_double_quant_stores_about_4_13_bits_per_weight():
    w = torch.randn(512, 1024)
    single, double = quantize(w, double_quant=False), quantize(w, double_quant=True)

    def bits(q):  # per weight, leaving out the two code tables (16 and 256 floats per layer)
        tensors = [q.packed, q.absmax, q.nested_absmax]
        return sum(t.numel() * t.element_size() * 8 for t in tensors if t is not None) / w.numel()

    assert bits(single) == pytest.approx(4 + 32 / 64)
    assert bits(double) == pytest.approx(4 + 8 / 64 + 32 / (64 * 256))


def test_all_zero_block_dequantizes_to_zeros():
    w = torch.randn(4, 64)
    w[1] = 0.0
    for double_quant in (False, True):
        out = quantize(w, double_quant=double_quant).dequantize(torch.float32)
        assert torch.isfinite(out).all() and (out[1] == 0).all()


def test_quantize_rejects_unsupported_input_with_clear_errors():
    with pytest.raises(QuantizationError, match=r"blocksize 48 .* use one of"):
        quantize(torch.randn(4, 64), blocksize=48)
    with pytest.raises(QuantizationError, match="float weights; got dtype torch.int64"):
        quantize(torch.ones(4, 64, dtype=torch.long))


def _layer(in_features=96, out_features=40, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
def test_linear4bit_forward_is_linear_with_dequantized_weight(bias):
    linear = _layer(bias=bias)
    q = Linear4bit.from_linear(linear, compute_dtype=torch.float32)
    x = torch.randn(2, 5, 96)
    assert (q.in_features, q.out_features) == (96, 40)
    torch.testing.assert_close(q(x), F.linear(x, q.dequantize(), q.bias), rtol=1e-6, atol=1e-6)
    # close to the float layer: output relative error of NF4 on kaiming-uniform weights (measured 0.089)
    ref = linear(x)
    assert ((q(x) - ref).norm() / ref.norm()).item() < 0.12


def test_linear4bit_bf16_compute_returns_input_dtype():
    linear = _layer()
    q = Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
    assert q.bias.dtype == torch.bfloat16
    x = torch.randn(3, 96)
    y = q(x)
    assert y.dtype == torch.float32
    expected = F.linear(x.bfloat16(), q.dequantize(), q.bias).float()
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    assert ((y - linear(x)).norm() / linear(x).norm()).item() < 0.12  # measured 0.091


def test_linear4bit_backward_gives_input_grad_of_dequantized_linear():
    q = Linear4bit.from_linear(_layer(), compute_dtype=torch.float32)
    x = torch.randn(4, 7, 96, requires_grad=True)
    g = torch.randn(4, 7, 40)
    q(x).backward(g)
    x_ref = x.detach().clone().requires_grad_()
    F.linear(x_ref, q.dequantize(), q.bias).backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    assert not any(p.requires_grad for p in q.parameters())
    assert all(b.grad is None for b in q.buffers())


def test_linear4bit_backward_saves_no_dequantized_weight():
    q = Linear4bit.from_linear(_layer(in_features=128, out_features=64), compute_dtype=torch.float32)
    x = torch.randn(3, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = q(x)
    assert (64, 128) not in saved and (128, 64) not in saved
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_linear4bit_buffers_move_and_stay_float32_when_module_is_cast():
    q = Linear4bit.from_linear(_layer(), compute_dtype=torch.float32)
    before = q.dequantize()
    q.to(torch.float16)
    dtypes = {k: v.dtype for k, v in q.state_dict().items()}
    assert dtypes == {
        "bias": torch.float16,
        "weight": torch.uint8,
        "weight_absmax": torch.uint8,
        "weight_quant_map": torch.float32,
        "weight_nested_absmax": torch.float32,
        "weight_nested_quant_map": torch.float32,
        "weight_nested_offset": torch.float32,
    }
    assert torch.equal(q.dequantize(), before)
    q.to("meta")
    assert all(t.device.type == "meta" for t in q.state_dict().values())


def test_linear4bit_state_dict_reloads_into_same_shaped_layer():
    a = Linear4bit.from_linear(_layer(seed=0), compute_dtype=torch.float32)
    b = Linear4bit.from_linear(_layer(seed=1), compute_dtype=torch.float32)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 96)
    assert torch.equal(a(x), b(x))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_linear4bit_on_cuda_matches_cpu():
    q = Linear4bit.from_linear(_layer(in_features=4096, out_features=256), compute_dtype=torch.bfloat16)
    x = torch.randn(8, 4096, dtype=torch.bfloat16)
    y_cpu = q(x)
    q_cuda = Linear4bit.from_linear(_layer(in_features=4096, out_features=256).cuda(), compute_dtype=torch.bfloat16)
    assert torch.equal(q_cuda.weight.cpu(), q.weight)  # quantizing on the GPU gives the same codes
    torch.testing.assert_close(q.to("cuda")(x.cuda()).cpu(), y_cpu, rtol=2e-2, atol=2e-2)
