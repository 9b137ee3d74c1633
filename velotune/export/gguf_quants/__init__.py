"""GGML tensor types velotune writes, as a registry: GGMLQuantizationType -> Quantizer.

Float types, Q8_0 and the two fallback types (Q5_0, Q5_1) use gguf-py's own quantizers; gguf-py only reads the
k-quants, so Q4_K, Q5_K and Q6_K are ours (one module each, shared searches in `kquant_common`). Every quantizer
takes float32 rows (n, k) and returns the tensor's bytes; k-quants work through the rows in cache-sized chunks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf import quants as gguf_quants

from velotune.export.gguf_quants import q4_k, q5_k, q6_k

CHUNK_BLOCKS = 512  # 256-value blocks per vectorised step: ~0.5 MB of float32, so the temporaries stay in cache


@dataclass(frozen=True)
class Quantizer:
    """One GGML type: how to turn float32 rows into its bytes and back."""

    qtype: GGMLQuantizationType
    quantize_rows: Callable[[np.ndarray], np.ndarray]
    dequantize_rows: Callable[[np.ndarray], np.ndarray]

    @property
    def block_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][0]

    @property
    def type_size(self) -> int:
        return GGML_QUANT_SIZES[self.qtype][1]

    def fits(self, row_len: int) -> bool:
        """Whether rows of this length split into whole blocks."""
        return row_len % self.block_size == 0

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of a tensor of `shape` (numpy order, rows last) in this type."""
        n = int(np.prod(shape))
        return n // self.block_size * self.type_size

    def quantize(self, rows: np.ndarray) -> np.ndarray:
        """(n, k) float32 -> this type's data (float arrays for F32/F16, else (n, k / block * type_size) uint8)."""
        return self.quantize_rows(np.ascontiguousarray(rows, dtype=np.float32))

    def dequantize(self, data: np.ndarray) -> np.ndarray:
        """This type's data (as `quantize` returns it) -> (n, k) float32."""
        return self.dequantize_rows(data)


def _ours(module: ModuleType) -> Quantizer:
    """A Quantizer for one of our k-quant modules, chunked over blocks."""
    block, size = module.BLOCK_SIZE, module.TYPE_SIZE

    def quantize_rows(rows: np.ndarray) -> np.ndarray:
        blocks = rows.reshape(-1, block)  # (nb, 256)
        out = np.empty((blocks.shape[0], size), dtype=np.uint8)
        for i in range(0, blocks.shape[0], CHUNK_BLOCKS):
            out[i : i + CHUNK_BLOCKS] = module.quantize_blocks(blocks[i : i + CHUNK_BLOCKS])
        return out.reshape(*rows.shape[:-1], rows.shape[-1] // block * size)

    def dequantize_rows(data: np.ndarray) -> np.ndarray:
        blocks = data.reshape(-1, size)
        return module.dequantize_blocks(blocks).reshape(*data.shape[:-1], data.shape[-1] // size * block)

    return Quantizer(module.QTYPE, quantize_rows, dequantize_rows)


def _gguf_native(qtype: GGMLQuantizationType) -> Quantizer:
    """A Quantizer backed by gguf-py's quantize/dequantize."""

    def quantize_rows(rows: np.ndarray) -> np.ndarray:
        return gguf_quants.quantize(rows, qtype)

    def dequantize_rows(data: np.ndarray) -> np.ndarray:
        return gguf_quants.dequantize(data, qtype)

    return Quantizer(qtype, quantize_rows, dequantize_rows)


T = GGMLQuantizationType
QUANTIZERS: dict[GGMLQuantizationType, Quantizer] = {
    T.F32: _gguf_native(T.F32),
    T.F16: _gguf_native(T.F16),
    T.BF16: _gguf_native(T.BF16),
    T.Q8_0: _gguf_native(T.Q8_0),
    T.Q5_0: _gguf_native(T.Q5_0),
    T.Q5_1: _gguf_native(T.Q5_1),
    T.Q4_K: _ours(q4_k),
    T.Q5_K: _ours(q5_k),
    T.Q6_K: _ours(q6_k),
}
