"""Q6_K: 256-value super-blocks of sixteen 16-value sub-blocks, symmetric 6-bit q with an 8-bit signed scale each.

Block layout (210 bytes): 128 bytes of low nibbles, 64 bytes of 2-bit high parts, 16 int8 scales, d (fp16);
value = d * scale_j * (q - 32). Quantization follows llama.cpp's reference (no importance matrix):
`search_symmetric_scale` per sub-block (nmax 32, weights x^2), the signed scale of largest magnitude maps to -128,
scales rounded to int8, then q recomputed from the rounded scales. gguf-py only dequantizes this type, hence our
writer.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from velotune.export.gguf_quants.kquant_common import GROUP_MAX_EPS, fp16_round, search_symmetric_scale

QTYPE = GGMLQuantizationType.Q6_K
BLOCK_SIZE = 256
TYPE_SIZE = 210

_HIGH_SHIFTS = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)


def quantize_blocks(x: np.ndarray) -> np.ndarray:
    """(nb, 256) float32 -> (nb, 210) uint8 Q6_K blocks."""
    f32 = np.float32
    nb = x.shape[0]
    sub = x.reshape(nb * 16, 16)  # (S, 16)
    scale, q = search_symmetric_scale(sub, nmax=32)
    scale = scale.reshape(nb, 16)
    imax = np.abs(scale).argmax(axis=1)
    max_scale = np.take_along_axis(scale, imax[:, None], axis=1)[:, 0]  # signed, (nb,)
    zero = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(divide="ignore", invalid="ignore"):
        iscale = np.where(zero, f32(0), f32(-128) / np.where(zero, f32(1), max_scale))
        d_bytes, d = fp16_round(np.where(zero, f32(0), f32(1) / np.where(zero, f32(1), iscale)))
    sc = np.minimum(np.rint(iscale[:, None] * scale), 127).astype(np.int8)  # (nb, 16)
    sub_d = (d[:, None] * sc.astype(np.float32)).reshape(-1)  # (S,)
    live = sub_d != 0  # llama.cpp keeps the search's q where the rounded scale is 0
    with np.errstate(divide="ignore", invalid="ignore"):
        rq = sub / np.where(live, sub_d, f32(1))[:, None]
    np.rint(rq, out=rq)
    np.clip(rq, -32, 31, out=rq)
    rq += f32(32)
    q = np.where(live[:, None], rq, q).reshape(nb, 2, 4, 32).astype(np.uint8)  # halves of 128, quarters of 32
    low = q & 0x0F
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = np.bitwise_or.reduce((q >> 4) << _HIGH_SHIFTS, axis=2)  # (nb, 2, 32)
    out = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8), d_bytes], axis=1)
    out[zero] = 0  # llama.cpp writes an all-zero block when every sub-block is zero
    return out


def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
    """(nb, 210) uint8 -> (nb, 256) float32."""
    nb = blocks.shape[0]
    ql = blocks[:, 0:128].reshape(nb, 2, 2, 32)  # halves, then the two 32-byte rows of each half
    qh = blocks[:, 128:192].reshape(nb, 2, 1, 32)
    sc = blocks[:, 192:208].copy().view(np.int8).astype(np.float32)  # (nb, 16)
    d = blocks[:, 208:210].copy().view(np.float16).astype(np.float32)  # (nb, 1)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2)  # (nb, 2, 4, 32): quarters 0, 1, 2, 3 of each half
    high = (qh >> _HIGH_SHIFTS[0]) & 0x03  # (nb, 2, 4, 32)
    q = (low | (high << 4)).astype(np.float32) - 32
    scale = (d * sc).reshape(nb, 16, 1)
    return (scale * q.reshape(nb, 16, 16)).reshape(nb, 256)
