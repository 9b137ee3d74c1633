"""Rotary embedding applied to q and k (rotate-half layout, as in Hugging Face checkpoints).

Partial rotary: only the first cos.shape[-1] channels of each head rotate. The PyTorch reference is the CPU path.
On CUDA one Triton program handles one (batch, position) for all heads of a tensor, loading that position's cos/sin
once, in fp32 with one rounding. Nothing but cos/sin is saved for backward (the rotation is linear), where the
reference keeps q- and k-sized products. Outputs take the inputs' strides, so the transposed [B, T, H, D] views from
the projections stay views. Both directions write new tensors: rotating the incoming gradient in place would save
only a transient [B, H, T, D] buffer and would overwrite a gradient the caller may still hold.
"""

from __future__ import annotations

import torch

from velotune.kernels._triton import (
    HAS_TRITON,
    next_power_of_2,
    no_triton_reason,
    reference_notice,
    tl,
    triton,
    use_triton,
)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos, sin [B, T, R] with R <= D. Returns the rotated x."""
    rot = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, R]
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


if triton is not None:

    @triton.jit
    def _rope_kernel(
        x_ptr,
        out_ptr,
        cos_ptr,
        sin_ptr,
        seq_len,
        n_heads,
        x_sb,
        x_sh,
        x_st,
        o_sb,
        o_sh,
        o_st,
        c_sb,
        c_st,
        HALF: tl.constexpr,
        PASS: tl.constexpr,
        BACKWARD: tl.constexpr,
        BLOCK_H: tl.constexpr,
        BLOCK_HALF: tl.constexpr,
        BLOCK_PASS: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        b = pid // seq_len
        t = pid % seq_len
        d = tl.arange(0, BLOCK_HALF)
        d_mask = d < HALF
        c_base = b * c_sb + t * c_st
        cos1 = tl.load(cos_ptr + c_base + d, mask=d_mask, other=0.0).to(tl.float32)  # [BLOCK_HALF]
        cos2 = tl.load(cos_ptr + c_base + HALF + d, mask=d_mask, other=0.0).to(tl.float32)
        sin1 = tl.load(sin_ptr + c_base + d, mask=d_mask, other=0.0).to(tl.float32)
        sin2 = tl.load(sin_ptr + c_base + HALF + d, mask=d_mask, other=0.0).to(tl.float32)
        if BACKWARD:  # the transpose of the rotation: the same form with (sin1, sin2) -> (-sin2, -sin1)
            sin1, sin2 = -sin2, -sin1
        h = tl.arange(0, BLOCK_H)
        mask = (h < n_heads)[:, None] & d_mask[None, :]  # [BLOCK_H, BLOCK_HALF]
        x_offs = b * x_sb + t * x_st + h[:, None] * x_sh + d[None, :]
        o_offs = b * o_sb + t * o_st + h[:, None] * o_sh + d[None, :]
        x1 = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptr + x_offs + HALF, mask=mask, other=0.0).to(tl.float32)
        out_ty = out_ptr.dtype.element_ty
        tl.store(out_ptr + o_offs, (x1 * cos1[None, :] - x2 * sin1[None, :]).to(out_ty), mask=mask)
        tl.store(out_ptr + o_offs + HALF, (x2 * cos2[None, :] + x1 * sin2[None, :]).to(out_ty), mask=mask)
        if PASS > 0:  # partial rotary: channels past 2 * HALF are copied
            p = tl.arange(0, BLOCK_PASS)
            p_mask = (h < n_heads)[:, None] & (p < PASS)[None, :]
            x_p = b * x_sb + t * x_st + h[:, None] * x_sh + 2 * HALF + p[None, :]
            o_p = b * o_sb + t * o_st + h[:, None] * o_sh + 2 * HALF + p[None, :]
            tl.store(out_ptr + o_p, tl.load(x_ptr + x_p, mask=p_mask, other=0.0), mask=p_mask)


def _rope_launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """Rotate x [B, H, T, D] (last dim contiguous) by cos/sin [B, T, R] into a new tensor with x's strides."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    bsz, n_heads, seq_len, dim = x.shape
    rot = cos.shape[-1]
    cos, sin = cos.expand(bsz, seq_len, rot), sin.expand(bsz, seq_len, rot)  # a batch-1 table broadcasts
    if cos.stride(-1) != 1 or cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    block_h, block_half = next_power_of_2(n_heads), next_power_of_2(rot // 2)
    num_warps = 4 if block_h * block_half <= 2048 else 8
    _rope_kernel[(bsz * seq_len,)](
        x,
        out,
        cos,
        sin,
        seq_len,
        n_heads,
        *(x.stride(i) for i in range(3)),
        *(out.stride(i) for i in range(3)),
        cos.stride(0),
        cos.stride(1),
        HALF=rot // 2,
        PASS=dim - rot,
        BACKWARD=backward,
        BLOCK_H=block_h,
        BLOCK_HALF=block_half,
        BLOCK_PASS=next_power_of_2(max(dim - rot, 1)),
        num_warps=num_warps,
    )
    return out


class RopeFunction(torch.autograd.Function):
    """Triton rotary embedding of q and k together; saves only cos and sin."""

    @staticmethod
    def forward(
        ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(cos, sin)
        return _rope_launch(q, cos, sin, False), _rope_launch(k, cos, sin, False)

    @staticmethod
    def backward(
        ctx, dq: torch.Tensor, dk: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        cos, sin = ctx.saved_tensors
        dq = _rope_launch(dq, cos, sin, True) if dq is not None and ctx.needs_input_grad[0] else None
        dk = _rope_launch(dk, cos, sin, True) if dk is not None and ctx.needs_input_grad[1] else None
        return dq, dk, None, None


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [B, Hq, T, D] and k [B, Hk, T, D] by position tables cos/sin [B, T, R]: Triton on CUDA."""
    if use_triton(q, k, cos, sin) and cos.shape[-1] % 2 == 0 and not (cos.requires_grad or sin.requires_grad):
        return RopeFunction.apply(q, k, cos, sin)
    if not HAS_TRITON:
        reference_notice("RoPE", no_triton_reason(), q)
    elif cos.shape[-1] % 2:
        reference_notice("RoPE", f"an odd number ({cos.shape[-1]}) of rotated channels", q)
    elif cos.requires_grad or sin.requires_grad:
        reference_notice("RoPE", "the position tables require gradients", q)
    return rope_reference(q, cos, sin), rope_reference(k, cos, sin)
