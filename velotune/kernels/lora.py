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

DoRA (weight-decomposed LoRA, PEFT's `use_dora`) is y = (m / ||W + s B A||) * (x W^T + s (x A^T) B^T) + b with
the row norm detached from the graph, as PEFT and the paper do. `DoRALinearFunction` and the DoRA projections of
`LoRAMLPFunction` never form W + s B A: ||W + s B A||^2 = ||W||^2 + 2 s rowsum(B * W A^T) + s^2 rowsum(B A A^T * B),
with ||W||^2 cached by the layer (W is frozen) and W A^T [out, r] taken from the weight the base matmul already
materialised. DoRA is then one per-feature multiply of the LoRA output, plus the unscaled output z kept for the
magnitude's gradient (sum over tokens of dy * z / norm).

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


def _base_grad(dy: torch.Tensor, weight: Weight, dx: torch.Tensor | None = None) -> torch.Tensor:
    """dy [N, out] @ W -> [N, in], added into `dx` when given; a storage with its own backward matmul
    (`base_grad_matmul`: FP8, quant/fp8.FP8FrozenWeight) runs it, any other weight is materialised."""
    grad_matmul = getattr(weight, "base_grad_matmul", None)
    if grad_matmul is None:
        w = _materialize(weight)
        return torch.mm(dy, w) if dx is None else dx.addmm_(dy, w)
    return grad_matmul(dy) if dx is None else dx.add_(grad_matmul(dy))


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


def dora_weight_norm(
    w: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    weight_sq_norm: torch.Tensor,
    wa: torch.Tensor | None = None,
) -> torch.Tensor:
    """||W + s B A|| per output row, [out] fp32 and out of the graph, without forming W + s B A.

    ||W||^2 (weight_sq_norm, fp32 [out]) + 2 s rowsum(B * W A^T) + s^2 rowsum(B A A^T * B): W A^T [out, r] (`wa`
    when the caller has it) is a product of the cost of a forward on r tokens, in W's dtype; A A^T is [r, r]; the
    sums are fp32.
    """
    with torch.no_grad():
        a, b = lora_a.detach().float(), lora_b.detach().float()
        wa = (w @ lora_a.detach().to(w.dtype).t() if wa is None else wa).float()  # [out, r]
        cross = (b * wa).sum(1)  # [out]
        lora_sq = ((b @ (a @ a.t())) * b).sum(1)  # [out]
        sq = weight_sq_norm + (2 * scaling) * cross + (scaling * scaling) * lora_sq
        return sq.clamp_min_(0).sqrt_()


def dora_linear_reference(
    x: torch.Tensor,
    weight: Weight,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """PEFT's DoRA by composition, forming W + s B A for its row norm: x [..., in] -> [..., out].

    y = x W^T + b + (g - 1) (x_l W^T) + g s (x_l A^T) B^T with g = m / ||W + s B A|| (norm detached) and x_l the
    adapter's input (dropout(x), or x): without dropout, g (x W^T + s (x A^T) B^T) + b.
    """
    w = _materialize(weight)
    with torch.no_grad():
        norm = torch.linalg.vector_norm(w.float() + scaling * (lora_b.float() @ lora_a.float()), dim=1)  # [out]
    g = (magnitude / norm).to(x.dtype)  # [out]
    a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
    base = F.linear(x, w)  # [..., out]
    xl = x if x_lora is None else x_lora
    base_l = base if x_lora is None else F.linear(x_lora, w)
    y = base + (g - 1) * base_l + g * ((xl @ a.t() @ b.t()) * scaling)
    return y if bias is None else y + bias


@dataclass(frozen=True, eq=False)
class LoRAWeights:
    """One frozen projection and its adapter: weight [out, in] (or a callable), bias [out], A [r, in], B [out, r];
    for DoRA also the magnitude m [out] and ||W||^2 per row [out] fp32 (None for LoRA)."""

    weight: Weight
    bias: torch.Tensor | None
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    magnitude: torch.Tensor | None = None
    weight_sq_norm: torch.Tensor | None = None


def lora_mlp_reference(
    x: torch.Tensor, gate: LoRAWeights, up: LoRAWeights, down: LoRAWeights, activation: str
) -> torch.Tensor:
    """down(act(gate(x), up(x))) by composition; activation is "silu" (SwiGLU) or "gelu_tanh" (GeGLU)."""
    act = GLU_VARIANTS[activation][0]

    def proj(t: torch.Tensor, p: LoRAWeights) -> torch.Tensor:
        if p.magnitude is not None:
            return dora_linear_reference(t, p.weight, p.bias, p.lora_a, p.lora_b, p.scaling, p.magnitude)
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
    """(y [N, out], xl2 A^T [N, r]) for x2, xl2 [N, in]; A, B in x2's dtype. The weight is materialised unless the
    storage has its own matmul (`base_matmul`: FP8, quant/fp8.FP8FrozenWeight) or multiplies few rows without it (a
    4-bit base's decode-time GEMV, models/frozen.FrozenWeight)."""
    xa = xl2 @ a.t()  # [N, r]
    own = getattr(weight, "base_matmul", None) or getattr(weight, "small_matmul", None)
    y = own(x2) if own is not None else None
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
        dx = _base_grad(dy, weight, dx)  # [N, in]
        if lora_dx_apart:
            dxl = dyb @ a
        else:
            dx.addmm_(dyb, a)
    da = (dyb.t() @ xl2).to(lora_a.dtype) if need_a else None  # [r, in]
    db = (dy.t() @ xa).to(lora_b.dtype).mul_(s) if need_b else None  # [out, r]
    return dx, dxl, da, db


def _dora_forward(
    x2: torch.Tensor,
    w: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    s: float,
    weight_sq_norm: torch.Tensor,
    m: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z = x2 W^T + s (x2 A^T) B^T [N, out], x2 A^T [N, r], m / ||W + s B A||, ||W + s B A|| [out] fp32) for x2
    [N, in] and the materialised weight w. With fewer tokens than half W's rows (decode, small batches) A's r rows
    ride along with x2 through the base matmul, which then also gives W A^T, so W is read once; otherwise W A^T is
    a product of its own (a read of W, against a base matmul of many tokens)."""
    a, b = lora_a.to(x2.dtype), lora_b.to(x2.dtype)
    n = x2.shape[0]
    xa = x2 @ a.t()  # [N, r]
    if 2 * n < w.shape[0]:
        both = F.linear(torch.cat([x2, a]), w)  # [N + r, out]
        z, wa = both[:n], both[n:].t()  # [N, out], [out, r]
    else:
        z, wa = F.linear(x2, w), None
    z.addmm_(xa, b.t(), alpha=s)
    norm = dora_weight_norm(w, lora_a, lora_b, s, weight_sq_norm, wa)
    return z, xa, m.detach().float() / norm, norm


def _scaled(z: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, in_place: bool) -> torch.Tensor:
    """z * scale + bias for z [N, out], scale and bias [out]; written over z when in_place."""
    g = scale.to(z.dtype)
    if in_place:
        z.mul_(g)
        return z if bias is None else z.add_(bias)
    return z * g if bias is None else torch.addcmul(bias, z, g)


def _magnitude_grad(dy: torch.Tensor, z: torch.Tensor, norm: torch.Tensor, rows: int = 1024) -> torch.Tensor:
    """d loss / d m = sum over tokens of dy * z / norm, [out] fp32, for dy and z [N, out]; summed `rows` tokens at a
    time so the product never takes a whole [N, out]."""
    acc = torch.zeros(dy.shape[1], dtype=torch.float32, device=dy.device)
    for i in range(0, dy.shape[0], rows):
        acc += (dy[i : i + rows] * z[i : i + rows]).sum(0, dtype=torch.float32)
    return acc.div_(norm)


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


class DoRALinearFunction(torch.autograd.Function):
    """y = g * (x W^T + s (x A^T) B^T) + b, g = m / ||W + s B A|| (detached), for a frozen W; saves x, x A^T [N, r],
    the unscaled output z [N, out] (for m's gradient), A, B, g and the norm.

    With dropout (x_lora = dropout(x)), PEFT's DoRA: y = x W^T + b + (g - 1) (x_l W^T) + g s (x_l A^T) B^T
    = (x - x_l) W^T + b + g z_l, with z_l the unscaled output on x_l: one more base matmul each way.
    Inputs: x, x_lora (or None), A, B, m, bias (frozen or trainable), weight (frozen tensor or callable), scaling,
    ||W||^2 per row (fp32 [out]).
    """

    @staticmethod
    def forward(ctx, x, x_lora, lora_a, lora_b, magnitude, bias, weight, scaling, weight_sq_norm):
        in_f = x.shape[-1]
        x2 = x.reshape(-1, in_f)  # [N, in]
        xl2 = x2 if x_lora is None else x_lora.reshape(-1, in_f)
        w = _materialize(weight)
        z, xa, scale, norm = _dora_forward(xl2, w, lora_a, lora_b, scaling, weight_sq_norm, magnitude)
        need_a, need_b, need_m = ctx.needs_input_grad[2:5]
        if x_lora is None:
            y = _scaled(z, scale, bias, in_place=not need_m)
        else:
            y = torch.addcmul(F.linear(x2 - xl2, w, bias), z, scale.to(z.dtype))
        del w
        ctx.save_for_backward(
            xl2 if need_a else None, xa if need_b else None, z if need_m else None, lora_a, lora_b, scale, norm
        )
        ctx.weight = weight  # as in LoRALinearFunction: on ctx, not through saved-tensor hooks
        ctx.scaling, ctx.x_shape, ctx.split, ctx.m_dtype = scaling, x.shape, x_lora is not None, magnitude.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        xl2, xa, z, lora_a, lora_b, scale, norm = ctx.saved_tensors
        need_x, need_xl, need_a, need_b, need_m, need_bias = ctx.needs_input_grad[:6]
        dy2 = dy.reshape(-1, dy.shape[-1])  # [N, out]
        dm = _magnitude_grad(dy2, z, norm).to(ctx.m_dtype) if need_m else None
        dz = dy2 * scale.to(dy2.dtype)  # [N, out]: gradient of the unscaled output
        need_dx = need_x or need_xl
        w = _materialize(ctx.weight) if need_dx else None
        dx, dxl, da, db = _lora_backward(
            dz, xl2, xa, w, lora_a, lora_b, ctx.scaling, need_dx, need_a, need_b, lora_dx_apart=ctx.split
        )
        del dz
        if ctx.split and need_dx:  # d x = dy W; d x_l = (dz - dy) W + s (dz B) A
            dyw = torch.mm(dy2, w)  # [N, in]
            dxl = dxl.add_(dx).sub_(dyw)
            dx = dyw
        dbias = dy2.sum(0) if need_bias else None
        dx = dx.view(ctx.x_shape) if need_x and dx is not None else None
        dxl = dxl.view(ctx.x_shape) if need_xl and dxl is not None else None
        return dx, dxl, da, db, dm, dbias, None, None, None


def dora_linear(
    x: torch.Tensor,
    weight: Weight,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: float,
    magnitude: torch.Tensor,
    weight_sq_norm: torch.Tensor,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., in] -> [..., out] through a frozen weight [out, in] (or a callable rebuilding it) with DoRA.

    weight_sq_norm is ||W||^2 per output row (fp32 [out]) of the weight `weight` gives. x_lora is dropout(x) when
    the adapter uses dropout (PEFT's semantics; None otherwise). A trainable base weight falls back to the
    composition. Unlike lora_linear there is no need_output=False: m's gradient needs the output.
    """
    if isinstance(weight, torch.Tensor) and weight.requires_grad:
        return dora_linear_reference(x, weight, bias, lora_a, lora_b, scaling, magnitude, x_lora)
    if x_lora is x:
        x_lora = None
    return DoRALinearFunction.apply(x, x_lora, lora_a, lora_b, magnitude, bias, weight, scaling, weight_sq_norm)


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


def _project(
    t: torch.Tensor, p: LoRAWeights, a: torch.Tensor, b: torch.Tensor, magnitude: torch.Tensor | None, keep_z: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One projection of the fused MLP on t [N, in], A and B in t's dtype: (output [N, out], DoRA's unscaled output
    z when keep_z, t A^T [N, r], DoRA's scale and norm [out]); LoRA (magnitude None) has no z, scale or norm."""
    if magnitude is None:
        y, xa = _lora_forward(t, t, p.weight, p.bias, a, b, p.scaling)
        return y, None, xa, None, None
    z, xa, scale, norm = _dora_forward(
        t, _materialize(p.weight), p.lora_a, p.lora_b, p.scaling, p.weight_sq_norm, magnitude
    )
    return _scaled(z, scale, p.bias, in_place=not keep_z), (z if keep_z else None), xa, scale, norm


def _dora_output_grad_(
    dout: torch.Tensor, z: torch.Tensor, scale: torch.Tensor | None, norm: torch.Tensor, need_m: bool, m_dtype
) -> torch.Tensor | None:
    """For a DoRA projection (scale not None) whose output gradient dout [N, out] this Function owns: m's gradient
    (when need_m), and dout turned in place into the gradient of the unscaled output (dout * scale)."""
    if scale is None:
        return None
    dm = _magnitude_grad(dout, z, norm).to(m_dtype) if need_m else None
    dout.mul_(scale.to(dout.dtype))
    return dm


class LoRAMLPFunction(torch.autograd.Function):
    """down(act(gate(x), up(x))) with LoRA or DoRA on all three; saves x, gate and up (for a DoRA projection its
    output before the per-feature scale, the scaled one being rebuilt in backward), the three [N, r] products and,
    for a DoRA down projection, its unscaled output."""

    @staticmethod
    def forward(
        ctx, x, gate_a, gate_b, up_a, up_b, down_a, down_b, gate_m, up_m, down_m, projs, activation, fused, need_output
    ):
        gate, up, down = projs
        x2 = x.reshape(-1, x.shape[-1])  # [N, H]
        dt = x.dtype
        g, zg, xa_g, sc_g, n_g = _project(x2, gate, gate_a.to(dt), gate_b.to(dt), gate_m, keep_z=True)  # [N, I]
        u, zu, xa_u, sc_u, n_u = _project(x2, up, up_a.to(dt), up_b.to(dt), up_m, keep_z=True)  # [N, I]
        h = _act_forward(g, u, activation, fused)  # [N, I]
        g, u = (g if zg is None else zg), (u if zu is None else zu)  # what backward keeps
        if need_output or down_m is not None:  # DoRA's magnitude gradient needs the down projection's output
            y, zd, xa_d, sc_d, n_d = _project(h, down, down_a.to(dt), down_b.to(dt), down_m, ctx.needs_input_grad[9])
        else:  # a LoRA recomputation whose output is discarded: the down projection's base matmul is skipped
            xa_d = h @ down_a.to(dt).t()
            y, zd, sc_d, n_d = x2.new_empty(x2.shape), None, None, None
        del h
        ctx.save_for_backward(
            x2, g, u, xa_g, xa_u, xa_d, zd, gate_a, gate_b, up_a, up_b, down_a, down_b, sc_g, n_g, sc_u, n_u, sc_d, n_d
        )
        ctx.weights = tuple(p.weight for p in projs)  # frozen tensors or callables: no copy is made
        ctx.scalings = tuple(p.scaling for p in projs)
        ctx.biases = tuple(p.bias for p in projs)
        ctx.m_dtypes = tuple(None if m is None else m.dtype for m in (gate_m, up_m, down_m))
        ctx.activation, ctx.fused, ctx.x_shape = activation, fused, x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, pre_g, pre_u, xa_g, xa_u, xa_d, zd, gate_a, gate_b, up_a, up_b, down_a, down_b = ctx.saved_tensors[:13]
        sc_g, n_g, sc_u, n_u, sc_d, n_d = ctx.saved_tensors[13:]
        w_gate, w_up, w_down = ctx.weights
        s_gate, s_up, s_down = ctx.scalings
        need = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1])  # [N, H]
        dm_d = _magnitude_grad(dy2, zd, n_d).to(ctx.m_dtypes[2]) if need[9] else None
        dz_d = dy2 if sc_d is None else dy2 * sc_d.to(dy.dtype)  # [N, H], before the down projection's DoRA scale
        # down projection: d h [N, I] always (gate/up adapters need it); its A-gradient needs h, rebuilt below
        a_d, b_d = down_a.to(dy.dtype), down_b.to(dy.dtype)
        dyb_d = (dz_d @ b_d).mul_(s_down)  # [N, r]
        dh = _base_grad(dz_d, w_down).addmm_(dyb_d, a_d)  # [N, I]
        db_d = (dz_d.t() @ xa_d).to(down_b.dtype).mul_(s_down) if need[6] else None
        del dz_d
        g = pre_g if sc_g is None else _scaled(pre_g, sc_g, ctx.biases[0], in_place=False)  # [N, I]
        u = pre_u if sc_u is None else _scaled(pre_u, sc_u, ctx.biases[1], in_place=False)
        dg, du, h = _act_backward(dh, g, u, ctx.activation, ctx.fused)
        del dh, g, u  # the fused kernel wrote d gate over dh
        da_d = (dyb_d.t() @ h).to(down_a.dtype) if need[5] else None
        del h
        dm_g = _dora_output_grad_(dg, pre_g, sc_g, n_g, need[7], ctx.m_dtypes[0])
        dm_u = _dora_output_grad_(du, pre_u, sc_u, n_u, need[8], ctx.m_dtypes[1])
        # gate and up share x: their input gradients accumulate into one [N, H] buffer
        dx, _, da_g, db_g = _lora_backward(dg, x2, xa_g, w_gate, gate_a, gate_b, s_gate, need[0], need[1], need[2])
        dx, _, da_u, db_u = _lora_backward(du, x2, xa_u, w_up, up_a, up_b, s_up, need[0], need[3], need[4], dx=dx)
        dx = dx.view(ctx.x_shape) if need[0] else None
        return dx, da_g, db_g, da_u, db_u, da_d, db_d, dm_g, dm_u, dm_d, None, None, None, None


def lora_mlp(
    x: torch.Tensor,
    gate: LoRAWeights,
    up: LoRAWeights,
    down: LoRAWeights,
    activation: str = "silu",
    need_output: bool = True,
) -> torch.Tensor:
    """Gated LoRA (or DoRA) MLP x [..., H] -> [..., H] without dropout; activation "silu" or "gelu_tanh".

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
    magnitudes = (gate.magnitude, up.magnitude, down.magnitude)
    return LoRAMLPFunction.apply(x, *loras, *magnitudes, projs, activation, fused, need_output)
