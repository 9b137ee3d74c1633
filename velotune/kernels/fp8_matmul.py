"""FP8 matmuls against a frozen float8_e4m3fn weight: y = x W^T (forward) and dx = dy W (backward).

The weight is stored as float8_e4m3fn [out, in] with float32 `scale_inv` per block of `block` = (rows, cols):
W ~= w8 * scale_inv, block (1, in) being one scale per output channel and (128, 128) DeepSeek-V3's block layout
(scale_inv [ceil(out / 128), ceil(in / 128)]). Activations and gradients are quantized on the fly, one scale per
row (amax / max of the format), so one outlier token never costs the others their precision.

Gradients are float8_e4m3fn by default (GRAD_DTYPE), not e5m2: with a scale per row the dynamic range e5m2 buys is
not needed (a row's largest value maps to 448 and the smallest normal e4m3 is 2^-6, a range of 2^14.8 per row),
and e4m3's third mantissa bit halves the rounding error (torchao's row-wise recipe and DeepSeek-V3 choose the same).
`grad_dtype=torch.float8_e5m2` is accepted for comparison.

For per-channel weights the backward folds the scale into dy before quantizing it, (dy * s) w8, since a scale per
output channel runs along the backward's contraction; the reference does the same, so every path computes the same
numbers up to accumulation order.

Paths: CUDA with compute capability >= 8.9 and bf16 activations takes `torch._scaled_mm` (row-wise scales, fp32
accumulation) for per-channel weights and the Triton kernel below for block-scaled ones; everything else (CPU, older
GPUs, other dtypes) takes the reference: quantize -> dequantize -> matmul in the activation dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from velotune.kernels._triton import HAS_TRITON, reference_notice, tl, triton, use_triton

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
GRAD_DTYPE = E4M3
MIN_CAPABILITY = (8, 9)  # Ada / Hopper: the first GPUs with FP8 tensor cores
_SCALE_FLOOR = 1e-12  # all-zero rows keep a tiny scale and quantize to zeros


def quantize_rows(x2: torch.Tensor, dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """x2 [N, K] -> (fp8 [N, K], float32 scale [N, 1]) with x2 ~= q * scale, one scale per row."""
    xf = x2.float()
    scale = xf.abs().amax(dim=1, keepdim=True).div_(FP8_MAX[dtype]).clamp_(min=_SCALE_FLOOR)  # [N, 1]
    return (xf / scale).clamp_(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype), scale


def expand_scale(scale_inv: torch.Tensor, block: tuple[int, int], shape: tuple[int, int]) -> torch.Tensor:
    """Block scales [ceil(rows / b0), ceil(cols / b1)] -> one scale per element [rows, cols] (float32)."""
    rows, cols = shape
    s = scale_inv.float().reshape(-(-rows // block[0]), -(-cols // block[1]))
    return s.repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]


def dequantize_fp8(w8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype):
    """fp8 weight [out, in] and its block scales -> the weight [out, in] in `dtype` (arithmetic in float32)."""
    rows, cols = w8.shape
    if block[1] >= cols:  # a scale per row (band of rows): no [out, in] float32 scale tensor
        s = scale_inv.float().reshape(-1).repeat_interleave(block[0])[:rows]  # [out]
        return (w8.float() * s.unsqueeze(1)).to(dtype)
    return (w8.float() * expand_scale(scale_inv, block, (rows, cols))).to(dtype)


def _per_channel(w8: torch.Tensor, block: tuple[int, int]) -> bool:
    return block[0] == 1 and block[1] >= w8.shape[1]


def fp8_matmul_reference(x2: torch.Tensor, w8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]):
    """x2 [N, in] @ W^T -> [N, out] in x2's dtype: x2 quantized to e4m3 per row, then both dequantized."""
    xq, sx = quantize_rows(x2, E4M3)
    return F.linear((xq.float() * sx).to(x2.dtype), dequantize_fp8(w8, scale_inv, block, x2.dtype))


def fp8_grad_matmul_reference(
    dy: torch.Tensor,
    w8: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int],
    grad_dtype: torch.dtype = GRAD_DTYPE,
) -> torch.Tensor:
    """dy [N, out] @ W -> [N, in] in dy's dtype, dy quantized per row to grad_dtype (per-channel: dy * s first)."""
    if _per_channel(w8, block):
        g = dy.float() * scale_inv.float().reshape(1, -1)  # [N, out]: the weight's scale moved onto dy
        w = w8.to(dy.dtype)
    else:
        g, w = dy, dequantize_fp8(w8, scale_inv, block, dy.dtype)
    gq, sg = quantize_rows(g, grad_dtype)
    return (gq.float() * sg).to(dy.dtype) @ w


if HAS_TRITON:

    @triton.jit
    def _fp8_block_matmul_kernel(
        a_ptr, sa_ptr, b_ptr, sb_ptr, c_ptr,
        M, N, K,
        stride_am, stride_ak, stride_bk, stride_bn, stride_sk, stride_sn, stride_cm, stride_cn,
        SCALE_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):  # fmt: skip
        # C[m, n] = sa[m] * sum over k blocks of sb[k // SCALE_BLOCK, n // SCALE_BLOCK] * (A8[m, k] @ B8[k, n])
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k = k0 + offs_k
            a = tl.load(
                a_ptr + offs_m[:, None] * stride_am + k[None, :] * stride_ak,
                mask=(offs_m[:, None] < M) & (k[None, :] < K),
                other=0.0,
            )
            b = tl.load(
                b_ptr + k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                mask=(k[:, None] < K) & (offs_n[None, :] < N),
                other=0.0,
            )
            sb = tl.load(
                sb_ptr + (k0 // SCALE_BLOCK) * stride_sk + (offs_n // SCALE_BLOCK) * stride_sn,
                mask=offs_n < N,
                other=0.0,
            )
            acc += tl.dot(a, b) * sb[None, :]
        sa = tl.load(sa_ptr + offs_m, mask=offs_m < M, other=0.0)
        acc = acc * sa[:, None]
        c = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn
        tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _block_matmul_triton(
    a8: torch.Tensor,
    sa: torch.Tensor,
    b8: torch.Tensor,
    scale_inv: torch.Tensor,
    scale_strides: tuple[int, int],
    out_dtype: torch.dtype,
    scale_block: int = 128,
) -> torch.Tensor:
    """a8 [M, K] (row scales sa [M, 1]) @ b8 [K, N] (any strides), b's scale at [k // 128, n // 128] read through
    scale_strides (k, n) of scale_inv: [M, N] in out_dtype."""
    m, k = a8.shape
    n = b8.shape[1]
    out = torch.empty(m, n, dtype=out_dtype, device=a8.device)
    block_m, block_n, block_k = 64, 128, 128
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _fp8_block_matmul_kernel[grid](
        a8, sa, b8, scale_inv, out, m, n, k,
        a8.stride(0), a8.stride(1), b8.stride(0), b8.stride(1), *scale_strides, out.stride(0), out.stride(1),
        SCALE_BLOCK=scale_block, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )  # fmt: skip
    return out


def fp8_block_matmul_triton(x2: torch.Tensor, w8: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """The forward x2 [N, in] @ W^T for a (128, 128) block-scaled weight through the Triton kernel."""
    xq, sx = quantize_rows(x2, E4M3)
    s = scale_inv.float()
    return _block_matmul_triton(xq, sx, w8.t(), s, (s.stride(1), s.stride(0)), x2.dtype)


def fp8_block_grad_matmul_triton(
    dy: torch.Tensor, w8: torch.Tensor, scale_inv: torch.Tensor, grad_dtype: torch.dtype = GRAD_DTYPE
) -> torch.Tensor:
    """The backward dy [N, out] @ W for a (128, 128) block-scaled weight through the Triton kernel."""
    gq, sg = quantize_rows(dy, grad_dtype)
    s = scale_inv.float()
    return _block_matmul_triton(gq, sg, w8, s, (s.stride(0), s.stride(1)), dy.dtype)


def _scaled_mm_applies(x2: torch.Tensor, w8: torch.Tensor) -> bool:
    return x2.dtype == torch.bfloat16 and all(d % 16 == 0 for d in w8.shape) and fp8_capable(x2.device)


def fp8_capable(device: torch.device) -> bool:
    """Whether `device` is a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def _fast_path(x2: torch.Tensor, w8: torch.Tensor, block: tuple[int, int]) -> str | None:
    """ "scaled_mm", "triton" or None (the reference), with a one-time notice when a GPU takes the reference."""
    if not x2.is_cuda:
        return "triton" if use_triton(x2) and block == (128, 128) else None  # the interpreter, in tests
    if not _scaled_mm_applies(x2, w8):
        reference_notice("FP8 matmul", "needs bf16 activations, dims divisible by 16 and compute capability 8.9", x2)
        return None
    if _per_channel(w8, block):
        return "scaled_mm"
    if block == (128, 128) and use_triton(x2):
        return "triton"
    reference_notice("FP8 matmul", f"block {block} needs Triton with (128, 128) blocks", x2)
    return None


def fp8_matmul(x2: torch.Tensor, w8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """x2 [N, in] @ W^T -> [N, out] in x2's dtype, x2 quantized to e4m3 per row (no autograd)."""
    path = _fast_path(x2, w8, block)
    if path == "scaled_mm":
        xq, sx = quantize_rows(x2, E4M3)
        s = scale_inv.float().reshape(1, -1)  # [1, out]
        return torch._scaled_mm(xq, w8.t(), scale_a=sx, scale_b=s, out_dtype=x2.dtype)
    if path == "triton":
        return fp8_block_matmul_triton(x2, w8, scale_inv)
    return fp8_matmul_reference(x2, w8, scale_inv, block)


def fp8_grad_matmul(
    dy: torch.Tensor,
    w8: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int],
    grad_dtype: torch.dtype = GRAD_DTYPE,
) -> torch.Tensor:
    """dy [N, out] @ W -> [N, in] in dy's dtype, dy quantized per row to grad_dtype (no autograd)."""
    path = _fast_path(dy, w8, block)
    if path == "scaled_mm":
        gq, sg = quantize_rows(dy.float() * scale_inv.float().reshape(1, -1), grad_dtype)
        ones = torch.ones(1, w8.shape[1], dtype=torch.float32, device=dy.device)
        w_cols = w8.t().contiguous().t()  # [out, in] column-major, as _scaled_mm takes its second operand
        return torch._scaled_mm(gq, w_cols, scale_a=sg, scale_b=ones, out_dtype=dy.dtype)
    if path == "triton":
        return fp8_block_grad_matmul_triton(dy, w8, scale_inv, grad_dtype)
    return fp8_grad_matmul_reference(dy, w8, scale_inv, block, grad_dtype)


class FP8LinearFunction(torch.autograd.Function):
    """y = x W^T + b for a frozen FP8 weight; backward dx = dy W through the FP8 matmul. Saves nothing but the
    weight's handles (the weight is frozen: no weight gradient)."""

    @staticmethod
    def forward(ctx, x, bias, w8, scale_inv, block):
        ctx.w = (w8, scale_inv, block)
        ctx.has_bias = bias is not None
        x2 = x.reshape(-1, x.shape[-1])  # [N, in]
        y = fp8_matmul(x2, w8, scale_inv, block)  # [N, out]
        if bias is not None:
            y += bias
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        dy2 = dy.reshape(-1, dy.shape[-1])  # [N, out]
        dx = fp8_grad_matmul(dy2, *ctx.w).view(*dy.shape[:-1], -1) if ctx.needs_input_grad[0] else None
        dbias = dy2.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return dx, dbias, None, None, None


def fp8_linear(
    x: torch.Tensor,
    w8: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., in] -> [..., out] through a frozen FP8 weight [out, in], FP8 both ways (differentiable in x, bias)."""
    return FP8LinearFunction.apply(x, bias, w8, scale_inv, tuple(block))
