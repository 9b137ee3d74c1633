"""x @ W.T for an NF4-stored W without materialising W: the decode-time matmul of a 4-bit base.

A decode step multiplies a few rows of activations by every weight, so its time is the time to read the weights.
Dequantizing a whole weight to 16 bits first writes and reads it again at 16 bits (4.5x the packed bytes), which made
a 4-bit model decode slower than its 16-bit original. This kernel is a GEMV: it streams the packed bytes once, looks
each nibble up in the 16-entry code table, multiplies by x in float32 on the CUDA cores (a tensor-core tile would be
mostly padding at a few rows) and applies each block's absmax once per block, after the block's dot product.

Layout (quant/nf4.py owns it): W [N, K] flattened row-major, two 4-bit codes per byte, the even element in the high
nibble; blocks of `blocksize` consecutive elements share an absmax (bitsandbytes' double quantization of the absmax
undone in the kernel, as in kernels/nf4.py). K must be a multiple of the blocksize (every decoder projection's is), so
a block never straddles two rows. The even columns of x meet the high nibbles and the odd columns the low ones, so no
nibble is interleaved.

Each program owns BLOCK_N output features and a slice of K (SPLIT_K slices add their float32 partial sums
atomically when N alone gives too few programs). Used for inputs of at most MAX_ROWS rows; larger inputs are
compute-bound and take dequantization + cuBLAS. The reference (CPU, and GPUs without Triton) is that: dequantize,
then matmul.
"""

from __future__ import annotations

import torch

from velotune.kernels._triton import next_power_of_2, num_programs, tl, triton, use_triton

MAX_ROWS = 16  # rows of x up to which the GEMV beats dequantization + cuBLAS
# (BLOCK_N, absmax blocks per iteration, num_warps) by rows of x; split-K chosen from N below
CONFIGS = {1: (16, 4, 4), 2: (16, 4, 4), 4: (16, 2, 4), 8: (16, 2, 4), 16: (8, 2, 4)}


def nf4_matmul_reference(x: torch.Tensor, nf4: object) -> torch.Tensor:
    """x [M, K] @ dequantize(W).T -> [M, N] in x's dtype."""
    return x @ nf4.dequantize(x.dtype).t()


if triton is not None:

    @triton.jit
    def _nf4_gemv_kernel(
        x_ptr,
        packed_ptr,
        absmax_ptr,
        code_ptr,
        nested_absmax_ptr,
        nested_code_ptr,
        offset_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_xm,
        blocks_per_split,
        BLOCKSIZE: tl.constexpr,
        NESTED_BLOCKSIZE: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        NB: tl.constexpr,
        ATOMIC: tl.constexpr,
    ):
        HALF: tl.constexpr = BLOCKSIZE // 2  # bytes per absmax block
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output features (rows of W)
        n_ok = rn < N
        rn64 = rn.to(tl.int64)
        blocks_per_row = K // BLOCKSIZE
        first = pid_k * blocks_per_split  # blocks_per_split is a multiple of NB
        j = tl.arange(0, HALF)  # [HALF] byte within a block
        nb = tl.arange(0, NB)  # [NB] block within an iteration
        rm = tl.arange(0, BLOCK_M)  # [BM]
        offset = 0.0
        if DOUBLE_QUANT:
            offset = tl.load(offset_ptr)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        row_bytes = rn64[:, None, None] * (K // 2)  # [BN, 1, 1]
        for i in range(0, blocks_per_split, NB):
            blk = first + i + nb  # [NB] block index within the row
            b_ok = blk < blocks_per_row
            w_ok = n_ok[:, None, None] & b_ok[None, :, None]
            byte = tl.load(packed_ptr + row_bytes + blk[None, :, None] * HALF + j[None, None, :], mask=w_ok, other=0)
            w_hi = tl.load(code_ptr + (byte >> 4).to(tl.int32))  # [BN, NB, HALF] fp32
            w_lo = tl.load(code_ptr + (byte & 15).to(tl.int32))
            g = rn64[:, None] * blocks_per_row + blk[None, :]  # [BN, NB] block index in the whole weight
            s_ok = n_ok[:, None] & b_ok[None, :]
            if DOUBLE_QUANT:
                q = tl.load(absmax_ptr + g, mask=s_ok, other=0).to(tl.int32)
                nested = tl.load(nested_absmax_ptr + g // NESTED_BLOCKSIZE, mask=s_ok, other=0.0)
                scale = tl.load(nested_code_ptr + q) * nested + offset
            else:
                scale = tl.load(absmax_ptr + g, mask=s_ok, other=0.0)
            col = blk[:, None] * BLOCKSIZE + 2 * j[None, :]  # [NB, HALF] even columns of x
            for m in tl.static_range(BLOCK_M):
                x_ok = b_ok[:, None] & (m < M)
                x_even = tl.load(x_ptr + m * stride_xm + col, mask=x_ok, other=0.0).to(tl.float32)  # [NB, HALF]
                x_odd = tl.load(x_ptr + m * stride_xm + col + 1, mask=x_ok, other=0.0).to(tl.float32)
                part = tl.sum(w_hi * x_even[None, :, :] + w_lo * x_odd[None, :, :], axis=2)  # [BN, NB]
                row = tl.sum(part * scale, axis=1)  # [BN]
                acc += tl.where(rm[:, None] == m, row[None, :], 0.0)
        out = out_ptr + rm[:, None] * N + rn[None, :]
        ok = (rm[:, None] < M) & n_ok[None, :]
        if ATOMIC:
            tl.atomic_add(out, acc, mask=ok, sem="relaxed")
        else:
            tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=ok)


def fused_applies(x: torch.Tensor, nf4: object) -> bool:
    """Whether nf4_matmul runs the GEMV for x: Triton on CUDA (or its interpreter), at most MAX_ROWS rows,
    fp16 / bf16 / fp32, a blocksize of 32-256 that divides K."""
    k = nf4.shape[1]
    return (
        use_triton(x, nf4.packed)
        and x.numel() // max(k, 1) <= MAX_ROWS
        and nf4.blocksize in (32, 64, 128, 256)
        and k % nf4.blocksize == 0
        and x.dtype in (torch.float16, torch.bfloat16, torch.float32)
    )


def _split_k(n: int, block_n: int, blocks_per_row: int, device: torch.device) -> int:
    """K slices so that about four programs per multiprocessor stream weights (1 when N gives that alone)."""
    programs = triton.cdiv(n, block_n)
    split = max(1, min(num_programs(device, waves=4) // programs, blocks_per_row // 8))
    return next_power_of_2(split) if split > 1 else 1


def nf4_matmul(x: torch.Tensor, nf4: object, config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """x [..., K] @ W.T -> [..., N] for an NF4Weight `nf4` of shape [N, K], in x's dtype.

    The GEMV for at most MAX_ROWS rows on CUDA with Triton and K a multiple of the blocksize; otherwise
    dequantization + matmul. config (BLOCK_N, NB, num_warps, split_k) overrides the table (benchmarks)."""
    y = nf4_gemv(x, nf4, config)
    if y is not None:
        return y
    n, k = nf4.shape
    return nf4_matmul_reference(x.reshape(-1, k), nf4).view(*x.shape[:-1], n)


def nf4_gemv(x: torch.Tensor, nf4: object, config: tuple[int, int, int, int] | None = None) -> torch.Tensor | None:
    """nf4_matmul through the GEMV, or None where it does not apply (see fused_applies)."""
    n, k = nf4.shape
    rows = x.reshape(-1, k)
    if not fused_applies(rows, nf4):
        return None
    rows = rows.contiguous()
    m = rows.shape[0]
    block_m = next_power_of_2(m)
    blocks_per_row = k // nf4.blocksize
    if config is None:
        block_n, nb, warps = CONFIGS[block_m]
        split = _split_k(n, block_n, blocks_per_row, x.device)
    else:
        block_n, nb, warps, split = config
    per_split = triton.cdiv(triton.cdiv(blocks_per_row, split), nb) * nb
    split = triton.cdiv(blocks_per_row, per_split)
    atomic = split > 1
    out = torch.zeros(m, n, dtype=torch.float32, device=x.device) if atomic else x.new_empty(m, n)
    double_quant = nf4.nested_absmax is not None
    absmax = nf4.absmax if double_quant else nf4.absmax.float()
    nested = nf4.nested_absmax if double_quant else absmax
    nested_code = nf4.nested_code if double_quant else absmax
    offset = nf4.offset if double_quant else absmax
    _nf4_gemv_kernel[(triton.cdiv(n, block_n), split)](
        rows,
        nf4.packed,
        absmax,
        nf4.code,
        nested,
        nested_code,
        offset,
        out,
        m,
        n,
        k,
        rows.stride(0),
        per_split,
        BLOCKSIZE=nf4.blocksize,
        NESTED_BLOCKSIZE=nf4.nested_blocksize,
        DOUBLE_QUANT=double_quant,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        NB=nb,
        ATOMIC=atomic,
        num_warps=warps,
    )
    return out.to(x.dtype).view(*x.shape[:-1], n)
