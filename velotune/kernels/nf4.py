"""Dequantize NF4: packed 4-bit codes and per-block absmax back to a 16/32-bit weight.

The storage is bitsandbytes' layout (see velotune/quant/nf4.py, which owns the format): the weight is flattened
row-major, split into blocks of `blocksize` values, each value is a 4-bit index into a 16-entry code table, two
indices per byte with the first value in the high nibble. Each block has one absmax. With double quantization the
absmax is itself stored as uint8 indices into a 256-entry code table, scaled per group of `nested_blocksize` blocks
by a float32 nested absmax, and shifted by one float32 offset. All arithmetic is float32; the result is cast once.

The reference below is the CPU path; the Triton kernel reads the same tensors on CUDA and undoes the double
quantization of the absmax itself, so no float32 absmax tensor is materialised.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the reference is used everywhere
    triton = None
    tl = None

HAS_TRITON = triton is not None


def absmax_reference(
    absmax: torch.Tensor,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """Float32 absmax per block [n_blocks]: undoes double quantization when nested_absmax is given."""
    if nested_absmax is None:
        return absmax.float()
    n_blocks = absmax.numel()
    n_groups = nested_absmax.numel()
    q = torch.nn.functional.pad(absmax.reshape(-1).int(), (0, n_groups * nested_blocksize - n_blocks))
    vals = nested_code.float()[q].view(n_groups, nested_blocksize)  # [groups, nested_blocksize]
    vals = vals * nested_absmax.float().view(n_groups, 1)
    return (vals.reshape(-1)[:n_blocks] + offset.float()).contiguous()  # [n_blocks]


def dequantize_nf4_reference(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    blocksize: int = 64,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """Pure-torch dequantization: packed uint8 [(n+1)//2, 1] -> tensor of `shape` in `dtype`."""
    n = 1
    for d in shape:
        n *= d
    data = packed.reshape(-1).view(torch.uint8)  # [(n + 1) // 2]
    table = code.float()
    pairs = torch.arange(256, device=data.device)
    pair_table = torch.stack((table[pairs >> 4], table[pairs & 15]), dim=1)  # [256, 2]: (high, low) nibble values
    vals = pair_table[data.int()].reshape(-1)  # [2 * ((n + 1) // 2)]
    scale = absmax_reference(absmax, nested_absmax, nested_code, offset, nested_blocksize)  # [n_blocks]
    n_blocks = scale.numel()
    vals = torch.nn.functional.pad(vals, (0, n_blocks * blocksize - vals.numel()))
    out = vals.view(n_blocks, blocksize) * scale.view(n_blocks, 1)  # [n_blocks, blocksize]
    return out.reshape(-1)[:n].to(dtype).view(shape)


if HAS_TRITON:

    @triton.jit
    def _dequantize_nf4_kernel(
        packed_ptr,
        absmax_ptr,
        code_ptr,
        nested_absmax_ptr,
        nested_code_ptr,
        offset_ptr,
        out_ptr,
        n_elements,
        n_bytes,
        BLOCKSIZE: tl.constexpr,
        NESTED_BLOCKSIZE: tl.constexpr,
        DOUBLE_QUANT: tl.constexpr,
        BYTES_PER_PROGRAM: tl.constexpr,
    ):
        pid = tl.program_id(0).to(tl.int64)
        byte_idx = pid * BYTES_PER_PROGRAM + tl.arange(0, BYTES_PER_PROGRAM)  # [BYTES]
        mask = byte_idx < n_bytes
        byte = tl.load(packed_ptr + byte_idx, mask=mask, other=0)
        hi = (byte >> 4).to(tl.int32)
        lo = (byte & 15).to(tl.int32)
        # blocksize is even, so both values of a byte share one block
        block = (byte_idx * 2) // BLOCKSIZE
        if DOUBLE_QUANT:
            q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
            nested = tl.load(nested_absmax_ptr + block // NESTED_BLOCKSIZE, mask=mask, other=0.0)
            scale = tl.load(nested_code_ptr + q, mask=mask, other=0.0) * nested + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=mask, other=0.0).to(tl.float32)
        v_hi = tl.load(code_ptr + hi, mask=mask, other=0.0) * scale
        v_lo = tl.load(code_ptr + lo, mask=mask, other=0.0) * scale
        out_idx = byte_idx * 2
        out_ty = out_ptr.dtype.element_ty
        tl.store(out_ptr + out_idx, v_hi.to(out_ty), mask=out_idx < n_elements)
        tl.store(out_ptr + out_idx + 1, v_lo.to(out_ty), mask=(out_idx + 1) < n_elements)


_BYTES_PER_PROGRAM = 1024


def _dequantize_nf4_triton(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype,
    nested_absmax: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    nested_blocksize: int,
) -> torch.Tensor:
    """Launch one program per 1024 packed bytes (2048 values)."""
    assert blocksize % 2 == 0, blocksize
    data = packed.reshape(-1).view(torch.uint8)
    out = torch.empty(shape, dtype=dtype, device=packed.device)
    n = out.numel()
    if n == 0:
        return out
    double_quant = nested_absmax is not None
    if double_quant:
        absmax = absmax.contiguous()
        nested_absmax = nested_absmax.float().contiguous()
        nested_code = nested_code.float().contiguous()
        offset = offset.float().reshape(1)
    else:
        absmax = absmax.float().contiguous()
        nested_absmax = nested_code = offset = absmax  # unused: DOUBLE_QUANT is a constexpr
    grid = (triton.cdiv(data.numel(), _BYTES_PER_PROGRAM),)
    _dequantize_nf4_kernel[grid](
        data,
        absmax,
        code.float().contiguous(),
        nested_absmax,
        nested_code,
        offset,
        out,
        n,
        data.numel(),
        BLOCKSIZE=blocksize,
        NESTED_BLOCKSIZE=nested_blocksize,
        DOUBLE_QUANT=double_quant,
        BYTES_PER_PROGRAM=_BYTES_PER_PROGRAM,
    )
    return out


def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    shape: tuple[int, ...] | torch.Size,
    dtype: torch.dtype,
    nested_absmax: torch.Tensor | None = None,
    nested_code: torch.Tensor | None = None,
    offset: torch.Tensor | None = None,
    blocksize: int = 64,
    nested_blocksize: int = 256,
) -> torch.Tensor:
    """Dequantize NF4 storage to `shape` in `dtype`: Triton on CUDA, the torch reference elsewhere.

    absmax is float32 [n_blocks], or uint8 [n_blocks] when nested_absmax [n_groups] (float32), nested_code [256]
    and offset (0-d float32) are given. No gradient flows: these are frozen weights.
    """
    if (nested_absmax is None) != (nested_code is None) or (nested_absmax is None) != (offset is None):
        raise ValueError("double-quantized absmax needs nested_absmax, nested_code and offset together")
    args = (packed, absmax, code, shape, dtype, nested_absmax, nested_code, offset, blocksize, nested_blocksize)
    if packed.is_cuda and HAS_TRITON:
        return _dequantize_nf4_triton(*args)
    return dequantize_nf4_reference(*args)
