"""DoRA's fast paths against PEFT's formula written out (kernels.lora.dora_linear_reference, which forms W + s B A):
the row norm from cached ||W||^2, the DoRA linear Function (biases, dropout), the DoRA layer on 16-bit, NF4 and int8
bases, and the fused MLP with DoRA projections; plus what they keep for backward."""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import torch
from torch import nn

from tests.kernels.compare import assert_matches, grads
from velotune.errors import ConfigError
from velotune.kernels.lora import (
    LoRAWeights,
    dora_linear,
    dora_linear_reference,
    dora_weight_norm,
    lora_mlp,
    lora_mlp_reference,
)
from velotune.lora.layers import LoRALinear
from velotune.quant.int8 import Linear8bit
from velotune.quant.nf4 import Linear4bit

QUANTIZED = {"nf4": Linear4bit.from_linear, "int8": Linear8bit.from_linear}


def _adapter(r: int, d_in: int, d_out: int, device: str = "cpu") -> tuple[torch.Tensor, ...]:
    """A [r, in], B [out, r] and a magnitude [out] near 1, all fp32 and trainable."""
    a = (0.1 * torch.randn(r, d_in, device=device)).requires_grad_()
    b = (0.1 * torch.randn(d_out, r, device=device)).requires_grad_()
    m = (1 + 0.2 * torch.randn(d_out, device=device)).requires_grad_()
    return a, b, m


def _saved(fn: Callable[[], torch.Tensor]) -> list[torch.Tensor]:
    kept: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        kept.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return kept


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dora_norm_from_cached_weight_norm_equals_the_norm_of_the_formed_sum(dtype):
    torch.manual_seed(0)
    w = (0.05 * torch.randn(300, 123)).to(dtype)
    a, b, _ = _adapter(16, 123, 300)
    sq = w.float().square().sum(1)
    want = torch.linalg.vector_norm(w.float() + 2.0 * (b.detach() @ a.detach()), dim=1)
    got = dora_weight_norm(w, a, b, 2.0, sq)
    assert got.dtype == torch.float32 and not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-6 if dtype == torch.float32 else 2e-3, atol=0)


# 10 tokens: A rides through the base matmul (fewer tokens than half of W's 77 rows); 120: W A^T apart
TOKENS = {"few-tokens": (2, 5), "many-tokens": (3, 40)}


@pytest.mark.parametrize("bias", ["none", "frozen", "trainable"])
@pytest.mark.parametrize("with_dropout_input", [False, True])
@pytest.mark.parametrize("tokens", TOKENS.values(), ids=TOKENS.keys())
def test_dora_linear_grads_equal_composition(bias, with_dropout_input, tokens):
    torch.manual_seed(0)
    x = torch.randn(*tokens, 123, requires_grad=True)
    weight = 0.1 * torch.randn(77, 123)
    b = None if bias == "none" else torch.randn(77, requires_grad=bias == "trainable")
    a_, b_, m = _adapter(16, 123, 77)
    x_lora = torch.nn.functional.dropout(x, 0.3) if with_dropout_input else None
    dy = torch.randn(*tokens, 77)
    out = dora_linear(x, weight, b, a_, b_, 2.0, m, weight.square().sum(1), x_lora)
    assert type(out.grad_fn).__name__ == "DoRALinearFunctionBackward"
    ref = dora_linear_reference(x, weight, b, a_, b_, 2.0, m, x_lora)
    assert_matches(out, ref)
    params = [t for t in (x, a_, b_, m, b) if t is not None and t.requires_grad]
    for got, want in zip(grads((out * dy).sum(), *params), grads((ref * dy).sum(), *params), strict=True):
        assert_matches(got, want)


@pytest.mark.parametrize("base", ["linear", "nf4", "int8"])
def test_dora_module_matches_its_composition(base):
    torch.manual_seed(0)
    linear = nn.Linear(96, 80)
    base_layer = linear if base == "linear" else QUANTIZED[base](linear, compute_dtype=torch.float32)
    layer = LoRALinear(base_layer.requires_grad_(False), r=8, alpha=16, use_dora=True)
    nn.init.normal_(layer.lora_B, std=0.1)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(80))
    x = torch.randn(3, 7, 96, requires_grad=True)
    dy = torch.randn(3, 7, 80)
    out = layer(x)
    assert type(out.grad_fn).__name__ == "DoRALinearFunctionBackward"
    weight = linear.weight if base == "linear" else base_layer.dequantize(torch.float32)
    ref = dora_linear_reference(
        x, weight, base_layer.bias, layer.lora_A, layer.lora_B, layer.scaling, layer.lora_magnitude_vector
    )
    assert_matches(out, ref)
    tensors = (x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)
    for got, want in zip(grads((out * dy).sum(), *tensors), grads((ref * dy).sum(), *tensors), strict=True):
        assert_matches(got, want)


@pytest.mark.parametrize("base", ["linear", "nf4"])
def test_new_dora_layer_is_its_base_exactly(base):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=False, dtype=torch.bfloat16)  # a bias is added after the scale: one rounding more
    base_layer = linear if base == "linear" else Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
    layer = LoRALinear(base_layer.requires_grad_(False), r=4, alpha=8, use_dora=True)
    x = torch.randn(2, 6, 64, dtype=torch.bfloat16)
    assert torch.equal(layer(x), base_layer(x))  # m = ||W|| and B = 0: the scale is exactly 1


def test_dora_layer_keeps_one_output_sized_tensor_and_no_dequantized_weight():
    torch.manual_seed(0)
    n, d_in, d_out = 64, 128, 256
    base = Linear4bit.from_linear(nn.Linear(d_in, d_out, bias=False, dtype=torch.bfloat16), torch.bfloat16)
    layer = LoRALinear(base.requires_grad_(False), r=16, alpha=16, use_dora=True)
    x = torch.randn(n, d_in, dtype=torch.bfloat16, requires_grad=True)
    kept = _saved(lambda: layer(x))
    params = {p.data_ptr() for p in layer.parameters()} | {x.data_ptr()}
    activations = [tuple(t.shape) for t in kept if t.data_ptr() not in params]
    big = [s for s in activations if s[0] * (s[1] if len(s) > 1 else 1) > n * 16 and s != (d_out,)]
    assert big == [(n, d_out)], activations  # the unscaled output, for the magnitude's gradient; x A^T is [n, 16]


def test_dora_on_a_base_without_a_readable_weight_is_refused():
    class Opaque(nn.Module):  # a linear-shaped module whose weight velotune cannot read
        in_features, out_features = 8, 8

        def __init__(self):
            super().__init__()
            self.register_buffer("state", torch.zeros(1))

    with pytest.raises(ConfigError, match="use_dora needs an nn.Linear or quantized linear base"):
        LoRALinear(Opaque(), r=2, alpha=2, use_dora=True)


def _mlp(
    hidden: int, inter: int, r: int, base: str, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> list[LoRAWeights]:
    """gate, up, down DoRA projections with biases; an NF4 base passes its dequantize as the weight."""
    projs = []
    for d_in, d_out in ((hidden, inter), (hidden, inter), (inter, hidden)):
        linear = nn.Linear(d_in, d_out, device=device, dtype=dtype).requires_grad_(False)
        weight = linear.weight
        if base == "nf4":
            weight = functools.partial(Linear4bit.from_linear(linear, compute_dtype=dtype).dequantize, dtype)
        sq = weight().float().square().sum(1) if callable(weight) else weight.float().square().sum(1)
        a, b, m = _adapter(r, d_in, d_out, device)
        projs.append(LoRAWeights(weight, linear.bias, a, b, 2.0, m, sq))
    return projs


def _mlp_tensors(x: torch.Tensor, projs: list[LoRAWeights]) -> list[torch.Tensor]:
    return [x] + [t for p in projs for t in (p.lora_a, p.lora_b, p.magnitude)]


@pytest.mark.parametrize(
    ("base", "activation", "tokens"),
    [("linear", "silu", 9), ("linear", "gelu_tanh", 9), ("nf4", "silu", 9), ("linear", "silu", 60)],
)
def test_dora_mlp_grads_equal_composition(base, activation, tokens):
    """18 tokens: A rides through every base matmul (gate/up 112 rows, down 48); 120: W A^T apart."""
    torch.manual_seed(0)
    projs = _mlp(48, 112, 8, base)
    x = torch.randn(2, tokens, 48, requires_grad=True)
    dy = torch.randn(2, tokens, 48)
    out, ref = lora_mlp(x, *projs, activation), lora_mlp_reference(x, *projs, activation)
    assert type(out.grad_fn).__name__ == "LoRAMLPFunctionBackward"
    assert_matches(out, ref)
    tensors = _mlp_tensors(x, projs)
    for got, want in zip(grads((out * dy).sum(), *tensors), grads((ref * dy).sum(), *tensors), strict=True):
        assert_matches(got, want)
    recomputed = lora_mlp(x, *projs, activation, need_output=False)  # a checkpoint recomputation
    for got, want in zip(grads((recomputed * dy).sum(), *tensors), grads((ref * dy).sum(), *tensors), strict=True):
        assert_matches(got, want)


def test_dora_mlp_keeps_as_many_intermediate_sized_tensors_as_lora():
    torch.manual_seed(0)
    n, hidden, inter = 32, 48, 112
    dora = _mlp(hidden, inter, 8, "linear")
    lora = [LoRAWeights(p.weight, p.bias, p.lora_a, p.lora_b, p.scaling) for p in dora]
    x = torch.randn(n, hidden, requires_grad=True)

    def intermediates(projs: list[LoRAWeights]) -> int:
        kept = _saved(lambda: lora_mlp(x, *projs))
        return len({t.data_ptr() for t in kept if t.numel() == n * inter})

    assert intermediates(dora) == intermediates(lora) == 2  # gate and up (DoRA: before their scale)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "gelu_tanh"])
def test_dora_mlp_with_triton_activation_matches_composition(triton_device, activation, dtype):
    torch.manual_seed(0)
    projs = _mlp(64, 160, 16, "linear", triton_device, dtype)
    x = torch.randn(3, 11, 64, device=triton_device, dtype=dtype, requires_grad=True)
    dy = torch.randn_like(x)
    out, ref = lora_mlp(x, *projs, activation), lora_mlp_reference(x, *projs, activation)
    assert_matches(out, ref)
    tensors = _mlp_tensors(x, projs)
    for got, want in zip(grads((out * dy).sum(), *tensors), grads((ref * dy).sum(), *tensors), strict=True):
        assert_matches(got, want, dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 matmuls of this size need a GPU")
@pytest.mark.parametrize("base", ["linear", "nf4"])
def test_dora_module_in_bf16_on_cuda_matches_its_composition(base):
    torch.manual_seed(0)
    linear = nn.Linear(4096, 1024, bias=False, device="cuda", dtype=torch.bfloat16)
    base_layer = linear if base == "linear" else Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
    layer = LoRALinear(base_layer.requires_grad_(False), r=16, alpha=16, use_dora=True)
    nn.init.normal_(layer.lora_B, std=0.02)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn(1024, device="cuda"))
    x = torch.randn(2, 512, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(2, 512, 1024, device="cuda", dtype=torch.bfloat16)
    out = layer(x)
    weight = linear.weight if base == "linear" else base_layer.dequantize(torch.bfloat16)
    ref = dora_linear_reference(x, weight, None, layer.lora_A, layer.lora_B, layer.scaling, layer.lora_magnitude_vector)
    assert_matches(out, ref)
    tensors = (x, layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)
    for got, want in zip(grads((out * dy).sum(), *tensors), grads((ref * dy).sum(), *tensors), strict=True):
        assert_matches(got, want, torch.bfloat16)
