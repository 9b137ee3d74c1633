"""Q4_K: 256-value super-blocks of eight 32-value sub-blocks, 4-bit q with a 6-bit scale and min per sub-block.

Block layout (144 bytes): d (fp16), dmin (fp16), 12 bytes of packed 6-bit scales/mins, 128 bytes of nibbles;
value = d * scale_j * q - dmin * min_j. Quantization follows llama.cpp's reference (no importance matrix):
weights |x| + rms(sub-block), `search_min_scale` with nmax 15 over 21 grids (rmin -1, step 0.1), scales and mins
rounded to 6 bits against the block maxima, then q recomputed from the rounded scales. gguf-py only dequantizes
this type, hence our writer.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from velotune.export.gguf_quants.kquant_common import quantize_min_scale_blocks, unpack_scales_k4

QTYPE = GGMLQuantizationType.Q4_K
BLOCK_SIZE = 256
TYPE_SIZE = 144


def quantize_blocks(x: np.ndarray) -> np.ndarray:
    """(nb, 256) float32 -> (nb, 144) uint8 Q4_K blocks."""
    nb = x.shape[0]
    d, dmin, scales, q = quantize_min_scale_blocks(x, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20)
    q = q.reshape(nb, 4, 2, 32)  # 64-value chunks: low nibble holds the first 32, high nibble the next 32
    qs = (q[:, :, 0, :] | (q[:, :, 1, :] << 4)).reshape(nb, 128)
    return np.concatenate([d, dmin, scales, qs], axis=1)


def dequantize_blocks(blocks: np.ndarray) -> np.ndarray:
    """(nb, 144) uint8 -> (nb, 256) float32."""
    nb = blocks.shape[0]
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)  # (nb, 1)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    ls, lm = unpack_scales_k4(blocks[:, 4:16])  # (nb, 8) each
    qs = blocks[:, 16:144].reshape(nb, 4, 1, 32)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(nb, 8, 32).astype(np.float32)
    scale = (d * ls.astype(np.float32))[:, :, None]  # (nb, 8, 1)
    offset = (dmin * lm.astype(np.float32))[:, :, None]
    return (scale * q - offset).reshape(nb, 256)
