"""LoRA linear y = x W^T + b + (x A^T) B^T * s, and the LoRA gated MLP, as hand-written autograd Functions.

The base weight W is frozen: a tensor [out, in], or a callable that rebuilds it (a quantized base's dequantize),
which runs again in backward instead of keeping a 16-bit copy alive. A [r, in] and B [out, r] are fp32 parameters
cast to the activation dtype; their gradients come back in fp32.

`LoRALinearFunction` saves x (already held by whoever produced it), x A^T [N, r], A and B. The composition
base(x) + (x @ A^T @ B^T) * s saves the same, but allocates three [N, out] temporaries in forward (the LoRA
product, its scaled copy, the sum) and one in backward (d out * s); here forward adds the LoRA product into the
base output in place (one addmm) and backward folds s into the [N, r] factors.

`LoRAMLPFunction` runs gate/up projections, the gated activation and the down projection in one Function. It saves
x, gate and up, and rebuilds act(gate) * up in backward, where the composition also keeps the down projection's
input: one [N, intermediate] tensor less per layer (117 MiB in bf16 at 4096 tokens for Llama-3.1-8B, 3.7 GiB over 32
layers without activation checkpointing). On CUDA the activation is the Triton kernel of kernels/glu.py, whose
backward writes d gate over the down projection's input gradient.

These are matmuls at heart; the same Functions run on CPU, where only the activation falls back to PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from velotune.kernels._triton import no_triton_reason, reference_notice, use_triton
from velotune.kernels.glu import GLU_VARIANTS, glu_backward, glu_forward

Weight = torch.Tensor | Callable[[], torch.Tensor]


def _materialize(weight: Weight) -> torch.Tensor:
    return weight() if callable(weight) else weight


def lora_linear_reference(
    x: torch.Tensor,
    weight: Weight,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """The plain composition: x [..., in] -> [..., out]; x_lora (dropout(x)) feeds the adapter when given."""
    a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    xl = x if x_lora is None else x_lora
    return F.linear(x, _materialize(weight), bias) + (xl @ a.t() @ b.t()) * scaling


@dataclass(frozen=True, eq=False)
class LoRAWeights:
    """One frozen projection and its adapter: weight [out, in] (or a callable), bias [out], A [r, in], B [out, r]."""

    weight: Weight
    bias: torch.Tensor | None
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float


def lora_mlp_reference(
    x: torch.Tensor, gate: LoRAWeights, up: LoRAWeights, down: LoRAWeights, activation: str
) -> torch.Tensor:
    """down(act(gate(x), up(x))) by composition; activation is "silu" (SwiGLU) or "gelu_tanh" (GeGLU)."""
    act = GLU_VARIANTS[activation][0]

    def proj(t: torch.Tensor, p: LoRAWeights) -> torch.Tensor:
        return lora_linear_reference(t, p.weight, p.bias, p.lora_a, p.lora_b, p.scaling)

    return proj(act(proj(x, gate), proj(x, up)), down)


def _lora_forward(
    x2: torch.Tensor,
    xl2: torch.Tensor,
    weight: Weight,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    b: torch.Tensor,
    s: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [N, out], xl2 A^T [N, r]) for x2, xl2 [N, in]; A, B already in x2's dtype."""
    xa = xl2 @ a.t()  # [N, r]
    small = getattr(weight, "small_matmul", None)  # a 4-bit base's decode-time GEMV (quant/nf4.FrozenWeight)
    y = small(x2) if small is not None else None
    if y is None:
        y = F.linear(x2, _materialize(weight), bias)  # [N, out]
    elif bias is not None:
        y += bias
    y.addmm_(xa, b.t(), alpha=s)
    return y, xa


def _lora_backward(
    dy: torch.Tensor,
    xl2: torch.Tensor | None,
    xa: torch.Tensor | None,
    weight: Weight,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s: float,
    need_x: bool,
    need_a: bool,
    need_b: bool,
    lora_dx_apart: bool = False,
    dx: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(dx, dx through the adapter alone or None, dA, dB in the parameters' dtype) for dy [N, out].

    dx = dy W + s (dy B) A, accumulated into `dx` when given. With lora_dx_apart the adapter's term is returned
    separately (its input was dropout(x), not x).
    """
    a, b = lora_a.to(dy.dtype), lora_b.to(dy.dtype)
    dyb = (dy @ b).mul_(s) if (need_x or need_a) else None  # [N, r], scaled once here
    dxl = None
    if need_x:
        w = _materialize(weight)
        dx = torch.mm(dy, w) if dx is None else dx.addmm_(dy, w)  # [N, in]
        if lora_dx_apart:
            dxl = dyb @ a
        else:
            dx.addmm_(dyb, a)
    da = (dyb.t() @ xl2).to(lora_a.dtype) if need_a else None  # [r, in]
    db = (dy.t() @ xa).to(lora_b.dtype).mul_(s) if need_b else None  # [out, r]
    return dx, dxl, da, db


class LoRALinearFunction(torch.autograd.Function):
    """y = x W^T + b + (x_lora A^T) B^T * s for a frozen W; saves x_lora (or x), x_lora A^T [N, r], A, B.

    Inputs: x, x_lora (or None), A, B, bias (frozen or trainable), weight (frozen tensor or callable), scaling,
    need_output (False: y is left uninitialised, for a recomputation whose output is discarded).
    """

    @staticmethod
    def forward(ctx, x, x_lora, lora_a, lora_b, bias, weight, scaling, need_output=True):
        in_f = x.shape[-1]
        x2 = x.reshape(-1, in_f)  # [N, in]
        xl2 = x2 if x_lora is None else x_lora.reshape(-1, in_f)
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
        if need_output:
            y, xa = _lora_forward(x2, xl2, weight, bias, a, b, scaling)
        else:
            xa = xl2 @ a.t()  # [N, r]
            y = x2.new_empty(x2.shape[0], b.shape[0])
        need_a, need_b = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        ctx.save_for_backward(xl2 if need_a else None, xa if need_b else None, lora_a, lora_b)
        # the frozen weight (a parameter, or a callable) rides on ctx: saved-tensor hooks (offload to host,
        # checkpointing) have no business copying it
        ctx.weight = weight
        ctx.scaling, ctx.x_shape, ctx.split = scaling, x.shape, x_lora is not None
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        xl2, xa, lora_a, lora_b = ctx.saved_tensors
        need_x, need_xl, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        dy2 = dy.reshape(-1, dy.shape[-1])  # [N, out]
        need_dx = need_x or need_xl
        dx, dxl, da, db = _lora_backward(
            dy2, xl2, xa, ctx.weight, lora_a, lora_b, ctx.scaling, need_dx, need_a, need_b, lora_dx_apart=ctx.split
        )
        dbias = dy2.sum(0) if need_bias else None
        dx = dx.view(ctx.x_shape) if need_x and dx is not None else None
        dxl = dxl.view(ctx.x_shape) if need_xl and dxl is not None else None
        return dx, dxl, da, db, dbias, None, None, None


def lora_linear(
    x: torch.Tensor,
    weight: Weight,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    x_lora: torch.Tensor | None = None,
    need_output: bool = True,
) -> torch.Tensor:
    """x [..., in] -> [..., out] through a frozen weight [out, in] (or a callable rebuilding it) plus LoRA.

    x_lora is dropout(x) when the adapter uses dropout (None otherwise). A trainable base weight falls back to the
    composition, since the Function never computes a base-weight gradient. need_output=False returns an
    uninitialised tensor with the same backward (no base matmul): for recomputations whose output is discarded.
    """
    if isinstance(weight, torch.Tensor) and weight.requires_grad:
        return lora_linear_reference(x, weight, bias, lora_a, lora_b, scaling, x_lora)
    if x_lora is x:
        x_lora = None
    return LoRALinearFunction.apply(x, x_lora, lora_a, lora_b, bias, weight, scaling, need_output)


class _FrozenLinearForBackward(torch.autograd.Function):
    """x [..., in] -> uninitialised [..., out] whose backward is dx = dy W for a frozen weight [out, in]."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.weight = weight
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        return dy @ ctx.weight, None


def project_for_backward(proj: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """proj(x) where only the backward matters (the value is discarded): the LoRA Function or a frozen nn.Linear
    skip the base matmul; any other module runs as usual."""
    forward_for_backward = getattr(proj, "forward_for_backward", None)
    if forward_for_backward is not None:
        return forward_for_backward(x)
    frozen = not proj.weight.requires_grad and (proj.bias is None or not proj.bias.requires_grad)
    if type(proj) is torch.nn.Linear and frozen:
        return _FrozenLinearForBackward.apply(x, proj.weight) if x.requires_grad else proj(x)
    return proj(x)


def _act_forward(g: torch.Tensor, u: torch.Tensor, activation: str, fused: bool) -> torch.Tensor:
    reference, gelu = GLU_VARIANTS[activation]
    return glu_forward(g, u, gelu) if fused else reference(g, u)


def _act_backward(
    dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor, activation: str, fused: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d gate, d up, act(gate) * up): the Triton kernel writes d gate over dh; PyTorch differentiates the reference."""
    reference, gelu = GLU_VARIANTS[activation]
    if fused:
        return glu_backward(dh, g, u, gelu, store_h=True, dg_into_dh=True)
    with torch.enable_grad():
        g_, u_ = g.detach().requires_grad_(), u.detach().requires_grad_()
        h = reference(g_, u_)
        dg, du = torch.autograd.grad(h, (g_, u_), dh)
    return dg, du, h.detach()


class LoRAMLPFunction(torch.autograd.Function):
    """down(act(gate(x), up(x))) with LoRA on all three; saves x, gate, up and the three [N, r] products."""

    @staticmethod
    def forward(ctx, x, gate_a, gate_b, up_a, up_b, down_a, down_b, projs, activation, fused, need_output=True):
        gate, up, down = projs
        x2 = x.reshape(-1, x.shape[-1])  # [N, H]
        dt = x.dtype
        g, xa_g = _lora_forward(x2, x2, gate.weight, gate.bias, gate_a.to(dt), gate_b.to(dt), gate.scaling)  # [N, I]
        u, xa_u = _lora_forward(x2, x2, up.weight, up.bias, up_a.to(dt), up_b.to(dt), up.scaling)  # [N, I]
        h = _act_forward(g, u, activation, fused)  # [N, I]
        if need_output:
            y, xa_d = _lora_forward(h, h, down.weight, down.bias, down_a.to(dt), down_b.to(dt), down.scaling)  # [N, H]
        else:  # a recomputation whose output is discarded: the down projection's base matmul is skipped
            xa_d = h @ down_a.to(dt).t()
            y = x2.new_empty(x2.shape)
        del h
        ctx.save_for_backward(x2, g, u, xa_g, xa_u, xa_d, gate_a, gate_b, up_a, up_b, down_a, down_b)
        ctx.weights = tuple(p.weight for p in projs)  # frozen tensors or callables: no copy is made
        ctx.scalings = tuple(p.scaling for p in projs)
        ctx.activation, ctx.fused, ctx.x_shape = activation, fused, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, g, u, xa_g, xa_u, xa_d, gate_a, gate_b, up_a, up_b, down_a, down_b = ctx.saved_tensors
        w_gate, w_up, w_down = ctx.weights
        s_gate, s_up, s_down = ctx.scalings
        need = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])  # [N, H]
        # down projection: d h [N, I] always (gate/up adapters need it); its A-gradient needs h, rebuilt below
        a_d, b_d = down_a.to(dy.dtype), down_b.to(dy.dtype)
        dyb_d = (dy2 @ b_d).mul_(s_down)  # [N, r]
        dh = torch.mm(dy2, _materialize(w_down)).addmm_(dyb_d, a_d)  # [N, I]
        db_d = (dy2.t() @ xa_d).to(down_b.dtype).mul_(s_down) if need[6] else None
        dg, du, h = _act_backward(dh, g, u, ctx.activation, ctx.fused)
        del dh  # the fused kernel wrote d gate over it
        da_d = (dyb_d.t() @ h).to(down_a.dtype) if need[5] else None
        del h
        # gate and up share x: their input gradients accumulate into one [N, H] buffer
        dx, _, da_g, db_g = _lora_backward(dg, x2, xa_g, w_gate, gate_a, gate_b, s_gate, need[0], need[1], need[2])
        dx, _, da_u, db_u = _lora_backward(du, x2, xa_u, w_up, up_a, up_b, s_up, need[0], need[3], need[4], dx=dx)
        dx = dx.view(ctx.x_shape) if need[0] else None
        return dx, da_g, db_g, da_u, db_u, da_d, db_d, None, None, None, None


def lora_mlp(
    x: torch.Tensor,
    gate: LoRAWeights,
    up: LoRAWeights,
    down: LoRAWeights,
    activation: str = "silu",
    need_output: bool = True,
) -> torch.Tensor:
    """Gated LoRA MLP x [..., H] -> [..., H] without LoRA dropout; activation "silu" or "gelu_tanh".

    The activation runs in Triton on CUDA. Trainable base weights or biases fall back to the composition.
    need_output=False returns an uninitialised tensor with the same backward, skipping the down projection's base
    matmul (for recomputations whose output is discarded).
    """
    projs = (gate, up, down)
    trainable_base = any(
        (isinstance(p.weight, torch.Tensor) and p.weight.requires_grad) or (p.bias is not None and p.bias.requires_grad)
        for p in projs
    )
    if trainable_base:
        return lora_mlp_reference(x, gate, up, down, activation)
    fused = use_triton(x)
    if not fused:
        reference_notice("gated activation (SwiGLU/GeGLU)", no_triton_reason(), x)
    loras = (gate.lora_a, gate.lora_b, up.lora_a, up.lora_b, down.lora_a, down.lora_b)
    return LoRAMLPFunction.apply(x, *loras, projs, activation, fused, need_output)
