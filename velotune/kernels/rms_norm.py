"""RMSNorm: y = x / rms(x) * (offset + w), computed in fp32.

offset is 0 for Llama-style norms and 1 for Gemma's (1 + w). The PyTorch reference is the CPU path. On CUDA a
Triton kernel normalises a tile of rows per program in fp32 and keeps only x and the fp32 reciprocal rms per row
[rows] for backward; autograd through the reference keeps two fp32 copies of x ([rows, H] each) for a 16-bit x.
Backward computes dx row by row and, when the weight trains, accumulates dw per program in fp32 before one sum.
"""

from __future__ import annotations

import torch

from velotune.kernels._triton import (
    HAS_TRITON,
    MAX_FUSED_SIZE,
    dense_rows,
    no_triton_reason,
    num_programs,
    reference_notice,
    row_block,
    tl,
    triton,
    use_triton,
)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (offset + weight.float())).to(x.dtype)


if triton is not None:

    @triton.jit
    def _rms_norm_forward_kernel(
        x_ptr,
        w_ptr,
        y_ptr,
        rstd_ptr,
        n_rows,
        n_cols,
        eps,
        offset,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
        cols = tl.arange(0, BLOCK_N)  # [BLOCK_N]
        row_mask = rows < n_rows
        mask = row_mask[:, None] & (cols < n_cols)[None, :]
        offs = rows[:, None] * n_cols + cols[None, :]  # [BLOCK_M, BLOCK_N]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)  # [BLOCK_M]
        w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32) + offset  # [BLOCK_N]
        y = (x * rstd[:, None]) * w[None, :]
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)

    @triton.jit
    def _rms_norm_backward_kernel(
        dy_ptr,
        x_ptr,
        w_ptr,
        rstd_ptr,
        dx_ptr,
        dw_ptr,
        n_rows,
        n_cols,
        offset,
        COMPUTE_DW: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        # Persistent: program p handles row tiles p, p + G, p + 2G ... and writes one fp32 partial dw row.
        pid = tl.program_id(0)
        n_prog = tl.num_programs(0)
        cols = tl.arange(0, BLOCK_N)
        col_mask = cols < n_cols
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32) + offset  # [BLOCK_N]
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(pid * BLOCK_M, n_rows, n_prog * BLOCK_M):
            rows = start + tl.arange(0, BLOCK_M).to(tl.int64)
            row_mask = rows < n_rows
            mask = row_mask[:, None] & col_mask[None, :]
            offs = rows[:, None] * n_cols + cols[None, :]
            x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)  # [BLOCK_M]
            x_hat = x * rstd[:, None]
            dy_w = dy * w[None, :]
            # d/dx of x * rstd(x): rstd * (g - x_hat * mean(g * x_hat)), with g = dy * (offset + w)
            proj = tl.sum(dy_w * x_hat, axis=1) / n_cols  # [BLOCK_M]
            dx = (dy_w - x_hat * proj[:, None]) * rstd[:, None]
            tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            if COMPUTE_DW:
                dw += tl.sum(dy * x_hat, axis=0)
        if COMPUTE_DW:
            tl.store(dw_ptr + pid * n_cols + cols, dw, mask=col_mask)


def _tile(n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M rows, BLOCK_N cols, num_warps): short rows (q/k norms over head_dim) share a program."""
    block_n, num_warps = row_block(n_cols)
    block_m = max(1, min(16, 2048 // block_n))
    return block_m, block_n, num_warps


def _rms_norm_forward(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, x as used, rstd fp32 [rows]). x keeps its layout when dense (e.g. a transposed q), else is copied."""
    if dense_rows(x) is None:
        x = x.contiguous()
    y = torch.empty_like(x)  # same strides as x, so its rows line up with x's in memory
    x2, y2 = dense_rows(x), dense_rows(y)  # [rows, H]
    n_rows, n_cols = x2.shape
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    block_m, block_n, num_warps = _tile(n_cols)
    grid = (triton.cdiv(n_rows, block_m),)
    _rms_norm_forward_kernel[grid](
        x2, weight, y2, rstd, n_rows, n_cols, eps, offset, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps
    )
    return y, x, rstd


def _rms_norm_backward(
    dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float, need_dw: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(dx in x's layout, dw in weight's dtype or None)."""
    if dy.stride() != x.stride():
        dy = torch.empty_like(x).copy_(dy)  # rows must line up with x's in memory
    dx = torch.empty_like(x)
    x2, dy2, dx2 = dense_rows(x), dense_rows(dy), dense_rows(dx)
    n_rows, n_cols = x2.shape
    block_m, block_n, num_warps = _tile(n_cols)
    n_prog = max(1, min(num_programs(x.device), triton.cdiv(n_rows, block_m)))
    dw_partial = torch.empty(n_prog if need_dw else 1, n_cols, dtype=torch.float32, device=x.device)
    _rms_norm_backward_kernel[(n_prog,)](
        dy2,
        x2,
        weight,
        rstd,
        dx2,
        dw_partial,
        n_rows,
        n_cols,
        offset,
        COMPUTE_DW=need_dw,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
    )
    dw = dw_partial.sum(0).to(weight.dtype) if need_dw else None
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    """Triton RMSNorm; saves x, weight and rstd fp32 [rows]."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float) -> torch.Tensor:
        y, x_used, rstd = _rms_norm_forward(x, weight, eps, offset)
        ctx.save_for_backward(x_used, weight, rstd)
        ctx.offset = offset
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        x, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_norm_backward(dy, x, weight, rstd, ctx.offset, ctx.needs_input_grad[1])
        return (dx if ctx.needs_input_grad[0] else None), dw, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dimension of x [..., H] with weight [H]: Triton on CUDA, the reference elsewhere."""
    if use_triton(x, weight) and x.numel() > 0 and x.shape[-1] <= MAX_FUSED_SIZE:
        return RMSNormFunction.apply(x, weight.contiguous(), eps, offset)
    if x.numel() > 0:
        why = no_triton_reason() if not HAS_TRITON else f"rows of {x.shape[-1]} values exceed {MAX_FUSED_SIZE}"
        reference_notice("RMSNorm", why, x)
    return rms_norm_reference(x, weight, eps, offset)
