"""LoRA projections and the LoRA MLP, forward + backward, at Llama-3.1-8B shapes with r=16 (CUDA).

Per projection: the old LoRALinear forward (base(x) + (x @ A^T @ B^T) * s, the reference composition) vs the
current one (kernels.lora.lora_linear), for a bf16 and an NF4 base. The MLP: the composition with the PyTorch
SwiGLU, the composition of fused pieces (LoRALinear x 3 + Triton SwiGLU, what the decoder runs today), and
kernels.lora.lora_mlp. DoRA rows (use_dora): the DoRA layer (kernels.lora.dora_linear, the norm from cached ||W||^2)
against PEFT's formula written out (dora_linear_reference, forming W + s B A each step as PEFT does), and lora_mlp
with DoRA projections. Gradients are taken for x, A, B and DoRA's magnitudes (the base is frozen).

python bench/bench_lora.py [--tokens 4096 --hidden 4096 --intermediate 14336 --kv-dim 1024 --r 16]
"""

from __future__ import annotations

import argparse
import functools

import torch
from _timing import Result, measure, print_table, require_cuda
from torch import nn

from velotune.kernels.glu import swiglu, swiglu_reference
from velotune.kernels.lora import LoRAWeights, dora_linear_reference, lora_mlp
from velotune.lora.layers import LoRALinear
from velotune.quant.nf4 import Linear4bit

DTYPE = torch.bfloat16


def make_layer(d_in: int, d_out: int, r: int, quant: bool, dora: bool = False) -> LoRALinear:
    base = nn.Linear(d_in, d_out, bias=False, device="cuda", dtype=DTYPE)
    base.weight.data.normal_(std=0.02)
    if quant:
        base = Linear4bit.from_linear(base, compute_dtype=DTYPE)
    layer = LoRALinear(base.requires_grad_(False), r=r, alpha=2 * r, use_dora=dora)
    nn.init.normal_(layer.lora_B, std=0.02)
    return layer


def composed(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """The LoRALinear forward before kernels.lora: base output plus the LoRA product, three [.., out] temporaries."""
    a, b = layer.lora_A.to(x.dtype), layer.lora_B.to(x.dtype)
    return layer.base_layer(x) + (x @ a.t() @ b.t()) * layer.scaling


def base_weight(layer: LoRALinear):
    """The base weight, or for an NF4 base its dequantize (the weight is rebuilt where it is used)."""
    base = layer.base_layer
    return base.weight if isinstance(base, nn.Linear) else functools.partial(base.dequantize, DTYPE)


def lora_weights(layer: LoRALinear) -> LoRAWeights:
    """A LoRALinear's tensors for kernels.lora.lora_mlp (an NF4 base passes its dequantize)."""
    return layer.lora_weights(DTYPE)


def peft_dora(layer: LoRALinear, x: torch.Tensor) -> torch.Tensor:
    """PEFT's DoRA forward, written out: W + s B A formed for the row norm (W dequantized for NF4)."""
    a, b, m = layer.lora_A, layer.lora_B, layer.lora_magnitude_vector
    return dora_linear_reference(x, base_weight(layer), None, a, b, layer.scaling, m)


def grads_of(x: torch.Tensor, layers: list[LoRALinear]):
    inputs = [x] + [p for layer in layers for p in (layer.lora_A, layer.lora_B, layer.lora_magnitude_vector)]
    inputs = [t for t in inputs if t is not None]

    def backward(out: torch.Tensor) -> None:
        torch.autograd.grad(out, inputs, torch.ones_like(out))

    return backward


def bench_projection(tokens: int, d_in: int, d_out: int, r: int, quant: bool) -> list[Result]:
    layer, dora = make_layer(d_in, d_out, r, quant), make_layer(d_in, d_out, r, quant, dora=True)
    x = torch.randn(1, tokens, d_in, device="cuda", dtype=DTYPE, requires_grad=True)
    backward, dora_backward = grads_of(x, [layer]), grads_of(x, [dora])
    return [
        measure("composition (old forward)", lambda: composed(layer, x), backward),
        measure("LoRALinear -> lora_linear", lambda: layer(x), backward),
        measure("DoRA: LoRALinear -> dora_linear", lambda: dora(x), dora_backward),
        measure("DoRA: PEFT's formula (W + sBA formed)", lambda: peft_dora(dora, x), dora_backward),
    ]


def bench_mlp(tokens: int, hidden: int, inter: int, r: int, quant: bool) -> list[Result]:
    gate, up, down = (make_layer(i, o, r, quant) for i, o in ((hidden, inter), (hidden, inter), (inter, hidden)))
    x = torch.randn(1, tokens, hidden, device="cuda", dtype=DTYPE, requires_grad=True)
    backward = grads_of(x, [gate, up, down])
    weights = [lora_weights(layer) for layer in (gate, up, down)]
    return [
        measure(
            "composition, torch swiglu",
            lambda: composed(down, swiglu_reference(composed(gate, x), composed(up, x))),
            backward,
        ),
        measure("LoRALinear x3 + triton swiglu", lambda: down(swiglu(gate(x), up(x))), backward),
        measure("lora_mlp (one Function)", lambda: lora_mlp(x, *weights, "silu"), backward),
    ]


def bench_dora_mlp(tokens: int, hidden: int, inter: int, r: int, quant: bool) -> list[Result]:
    shapes = ((hidden, inter), (hidden, inter), (inter, hidden))
    gate, up, down = (make_layer(i, o, r, quant, dora=True) for i, o in shapes)
    x = torch.randn(1, tokens, hidden, device="cuda", dtype=DTYPE, requires_grad=True)
    backward = grads_of(x, [gate, up, down])
    weights = [lora_weights(layer) for layer in (gate, up, down)]
    return [
        measure(
            "DoRA: PEFT's formula, torch swiglu",
            lambda: peft_dora(down, swiglu_reference(peft_dora(gate, x), peft_dora(up, x))),
            backward,
        ),
        measure("DoRA: lora_mlp (one Function)", lambda: lora_mlp(x, *weights, "silu"), backward),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--kv-dim", type=int, default=1024)
    p.add_argument("--r", type=int, default=16)
    a = p.parse_args()
    require_cuda()
    projections = {
        "q_proj": (a.hidden, a.hidden),
        "k_proj": (a.hidden, a.kv_dim),
        "gate_proj": (a.hidden, a.intermediate),
        "down_proj": (a.intermediate, a.hidden),
    }
    for quant in (False, True):
        base = "nf4" if quant else "bf16"
        for name, (d_in, d_out) in projections.items():
            title = f"lora {name} [{a.tokens} tokens, {d_in} -> {d_out}, r={a.r}, {base} base]"
            print_table(title, bench_projection(a.tokens, d_in, d_out, a.r, quant))
            torch.cuda.empty_cache()
        title = f"lora MLP [{a.tokens} tokens, {a.hidden} -> {a.intermediate} -> {a.hidden}, r={a.r}, {base} base]"
        print_table(title, bench_mlp(a.tokens, a.hidden, a.intermediate, a.r, quant))
        torch.cuda.empty_cache()
        print_table("dora" + title.removeprefix("lora"), bench_dora_mlp(a.tokens, a.hidden, a.intermediate, a.r, quant))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
