"""Q5_K: Q4_K's super-block with a fifth bit per value, stored in a 32-byte high-bit plane.

Block layout (176 bytes): d (fp16), dmin (fp16), 12 bytes of packed 6-bit scales/mins, 32 bytes of high bits,
128 bytes of low nibbles; value = d * scale_j * q - dmin * min_j with q in [0, 31]. Quantization follows
llama.cpp's reference: Q4_K's procedure with nmax 31 over 16 grids (rmin -0.5, step 0.1). gguf-py only
dequantizes this type, hence our writer.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from velotune.export.gguf_quants.kquant_common import quantize_min_scale_blocks, unpack_scales_k4

QTYPE = GGMLQuantizationType.Q5_K
BLOCK_SIZE = 256
TYPE_SIZE = 176

_HIGH_SHIFTS = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)  # sub-block j's fifth bit sits in bit j of qh


def quantize_blocks(x: np.ndarray) -> np.ndarray:
    """(nb, 256) float32 -> (nb, 176) uint8 Q5_K blocks."""
    nb = x.shape[0]
    d, dmin, scales, q = quantize_min_scale_blocks(x, nmax=31, rmin=-0.5, rdelta=0.1, nstep=15)
    q = q.reshape(nb, 8, 32)
    qh = np.bitwise_or.reduce((q >> 4) << _HIGH_SHIFTS, axis=1)  # (nb, 32)
    low = (q & 0x0F).reshape(nb, 4, 2, 32)
    ql = (low[:, :, 0, :] | (low[:, :, 1, :] << 4)).reshape(nb, 128)
    return np.concatenate([d, dmin, scales, qh, ql], axis=1)


def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
    """(nb, 176) uint8 -> (nb, 256) float32."""
    nb = blocks.shape[0]
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # (nb, 1)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    ls, lm = unpack_scales_k4(blocks[:, 4:16])  # (nb, 8)
    qh = blocks[:, 16:48].reshape(nb, 1, 32)
    ql = blocks[:, 48:176].reshape(nb, 4, 1, 32)
    low = np.concatenate([ql & 0x0F, ql >> 4], axis=2).reshape(nb, 8, 32)
    high = (qh >> _HIGH_SHIFTS) & 1  # (nb, 8, 32)
    q = (low | (high << 4)).astype(np.float32)
    scale = (d * ls.astype(np.float32))[:, :, None]
    offset = (dmin * lm.astype(np.float32))[:, :, None]
    return (scale * q - offset).reshape(nb, 256)
