"""Gated MLP activations: SwiGLU silu(g) * u (Llama, Qwen, Mistral, Phi-3) and GeGLU gelu_tanh(g) * u (Gemma).

The PyTorch references are the CPU path. On CUDA one elementwise Triton kernel computes the product in fp32 and
saves only gate and up for backward; autograd through the reference also keeps act(gate), a third [tokens,
intermediate] tensor per layer (117 MiB in bf16 for 4096 tokens x 14336). The backward kernel can also rebuild
act(gate) * up and write d gate over d out, which the fused LoRA MLP (kernels/lora.py) uses instead of saving it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from velotune.kernels._triton import HAS_TRITON, no_triton_reason, reference_notice, tl, triton, use_triton


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def geglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh") * up


if triton is not None:

    @triton.jit
    def _tanh(x):
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0

    @triton.jit
    def _act_and_grad(g, GELU: tl.constexpr):
        """act(g) and act'(g) in fp32: silu, or gelu with the tanh approximation."""
        if GELU:  # 0.7978845608028654 = sqrt(2 / pi)
            inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
            t = _tanh(inner)
            act = 0.5 * g * (1.0 + t)
            d_act = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
        else:
            s = tl.sigmoid(g)
            act = g * s
            d_act = s * (1.0 + g * (1.0 - s))
        return act, d_act

    @triton.jit
    def _glu_forward_kernel(g_ptr, u_ptr, h_ptr, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        act, _ = _act_and_grad(g, GELU)
        tl.store(h_ptr + offs, (act * u).to(h_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _glu_backward_kernel(
        dh_ptr,
        g_ptr,
        u_ptr,
        dg_ptr,
        du_ptr,
        h_ptr,
        n,
        GELU: tl.constexpr,
        STORE_H: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        act, d_act = _act_and_grad(g, GELU)
        # dg_ptr may alias dh_ptr: each element is read above before it is written here
        tl.store(dg_ptr + offs, (dh * u * d_act).to(dg_ptr.dtype.element_ty), mask=mask)
        tl.store(du_ptr + offs, (dh * act).to(du_ptr.dtype.element_ty), mask=mask)
        if STORE_H:
            tl.store(h_ptr + offs, (act * u).to(h_ptr.dtype.element_ty), mask=mask)


_BLOCK, _WARPS = 2048, 8


def glu_forward(gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
    """act(gate) * up for contiguous gate/up of one shape and dtype (Triton)."""
    h = torch.empty_like(gate)
    n = gate.numel()
    _glu_forward_kernel[(triton.cdiv(n, _BLOCK),)](gate, up, h, n, GELU=gelu, BLOCK=_BLOCK, num_warps=_WARPS)
    return h


def glu_backward(
    dh: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gelu: bool, store_h: bool = False, dg_into_dh: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(d gate, d up, act(gate) * up or None) for contiguous tensors (Triton).

    dg_into_dh writes d gate over dh, for callers that own dh (the fused MLP); autograd's incoming gradient is
    never overwritten.
    """
    dg = dh if dg_into_dh else torch.empty_like(gate)
    du = torch.empty_like(up)
    h = torch.empty_like(gate) if store_h else du  # du is a placeholder pointer when STORE_H is off
    n = gate.numel()
    grid = (triton.cdiv(n, _BLOCK),)
    _glu_backward_kernel[grid](dh, gate, up, dg, du, h, n, GELU=gelu, STORE_H=store_h, BLOCK=_BLOCK, num_warps=_WARPS)
    return dg, du, (h if store_h else None)


class GLUFunction(torch.autograd.Function):
    """Triton act(gate) * up; saves gate and up only."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor, gelu: bool) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()
        ctx.save_for_backward(gate, up)
        ctx.gelu = gelu
        return glu_forward(gate, up, gelu)

    @staticmethod
    def backward(ctx, dh: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        gate, up = ctx.saved_tensors
        dg, du, _ = glu_backward(dh.contiguous(), gate, up, ctx.gelu)
        return (dg if ctx.needs_input_grad[0] else None), (du if ctx.needs_input_grad[1] else None), None


def _fused(gate: torch.Tensor, up: torch.Tensor) -> bool:
    if use_triton(gate, up) and gate.shape == up.shape and gate.dtype == up.dtype:
        return True
    why = no_triton_reason() if not HAS_TRITON else "gate and up differ in shape or dtype"
    reference_notice("gated activation (SwiGLU/GeGLU)", why, gate)
    return False


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: Triton on CUDA, the reference elsewhere."""
    return GLUFunction.apply(gate, up, False) if _fused(gate, up) else swiglu_reference(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up: Triton on CUDA, the reference elsewhere."""
    return GLUFunction.apply(gate, up, True) if _fused(gate, up) else geglu_reference(gate, up)


GATED_ACTIVATIONS = {"silu": swiglu, "gelu_tanh": geglu}
# The same activations by name for fused callers: (reference, uses gelu in the Triton kernels)
GLU_VARIANTS = {"silu": (swiglu_reference, False), "gelu_tanh": (geglu_reference, True)}
