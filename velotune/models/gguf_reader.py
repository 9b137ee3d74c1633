"""A GGUF file's metadata and tensor table in one pass, its tensors as memory-mapped views.

Why not `gguf.GGUFReader`: it builds a numpy view for every part of every metadata field, so a 49K-token
vocabulary with its merges is ~250K small arrays: 6-11 s on a 2-core machine before the first tensor, paid by
every `velotune train` / `generate` on a GGUF. The format is a short header of little-endian values
(https://github.com/ggml-org/ggml/blob/master/docs/gguf.md); reading it with `struct` takes well under a second.
Dequantization stays with the `gguf` package (`gguf.quants.dequantize`), as do the type sizes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# metadata value types: fixed-size scalars by struct code; 8 is a string, 9 an array
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor: its GGUF name, shape in torch order ([rows, ..., row length]), ggml type and raw bytes."""

    name: str
    shape: tuple[int, ...]
    tensor_type: int
    data: np.ndarray  # uint8 [*shape[:-1], bytes per row], a view of the file mapping

    def dequantize(self) -> np.ndarray:
        """float32 array of `shape`."""
        import gguf

        fast = _FAST_DEQUANT.get(self.tensor_type)
        if fast is not None:
            return fast(self.data.reshape(-1, self.data.shape[-1])).reshape(self.shape)
        return gguf.quants.dequantize(self.data, gguf.GGMLQuantizationType(self.tensor_type)).reshape(self.shape)

    def as_float32(self) -> np.ndarray:
        """The values of a float tensor (F32/F16/BF16/F64) or a dequantized one, float32, flat."""
        return self.dequantize().reshape(-1).astype(np.float32)


def _scales(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at : at + 2].copy().view(np.float16).astype(np.float32)  # [n, 1]


def _q8_0(rows: np.ndarray) -> np.ndarray:  # 34-byte blocks: f16 scale, 32 int8
    blocks = rows.reshape(-1, 34)
    return (_scales(blocks, 0) * blocks[:, 2:].view(np.int8).astype(np.float32)).reshape(len(rows), -1)


def _nibbles(qs: np.ndarray) -> np.ndarray:  # [n, 16] bytes -> [n, 32]: low nibbles are elements 0-15
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32)


def _q4_0(rows: np.ndarray) -> np.ndarray:  # 18-byte blocks: f16 scale, 16 bytes of 4-bit values offset by 8
    blocks = rows.reshape(-1, 18)
    return (_scales(blocks, 0) * (_nibbles(blocks[:, 2:]) - 8.0)).reshape(len(rows), -1)


def _q4_1(rows: np.ndarray) -> np.ndarray:  # 20-byte blocks: f16 scale, f16 minimum, 16 bytes of 4-bit values
    blocks = rows.reshape(-1, 20)
    return (_scales(blocks, 0) * _nibbles(blocks[:, 4:]) + _scales(blocks, 2)).reshape(len(rows), -1)


# The types of llama.cpp's legacy quants, vectorised over the whole tensor (the gguf package groups rows: ~3 s for
# SmolLM2's Q4_1 file against ~0.3 s); checked against gguf.quants in tests/models/test_gguf_reader.py.
_FAST_DEQUANT = {2: _q4_0, 3: _q4_1, 8: _q8_0}


@dataclass(frozen=True)
class GGUFFile:
    """`fields`: every metadata key -> value (arrays as lists); `tensors` in file order."""

    path: Path
    fields: dict[str, Any]
    tensors: list[GGUFTensor]


class _Cursor:
    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str) -> tuple[Any, ...]:
        try:
            out = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error as exc:
            raise ValueError(f"truncated header at byte {self.pos}") from exc
        self.pos += struct.calcsize("<" + fmt)
        return out

    def string(self) -> str:
        (n,) = self.unpack("Q")
        if self.pos + n > len(self.buf):
            raise ValueError(f"truncated header at byte {self.pos}")
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])[0]
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("IQ")
            if etype in _SCALARS:
                return list(self.unpack(f"{count}{_SCALARS[etype]}"))
            return [self.value(etype) for _ in range(count)]
        raise ValueError(f"unknown metadata value type {vtype} at byte {self.pos}")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse `path`'s header; tensors are views of a read-only memory map (nothing is read until used).
    ValueError for a file that is not GGUF (v2/v3) or whose header or data is cut short."""
    import gguf

    path = Path(path)
    mm = np.memmap(path, mode="r", dtype=np.uint8)
    cur = _Cursor(memoryview(mm), path)
    if len(mm) < 24 or bytes(mm[:4]) != b"GGUF":
        raise ValueError("no GGUF magic bytes at the start")
    version, n_tensors, n_fields = cur.unpack("4xIQQ")
    if version not in (2, 3):
        raise ValueError(f"GGUF version {version}; velotune reads versions 2 and 3")
    fields: dict[str, Any] = {}
    for _ in range(n_fields):
        key = cur.string()
        (vtype,) = cur.unpack("I")
        fields[key] = cur.value(vtype)
    table = []
    for _ in range(n_tensors):
        name = cur.string()
        (n_dims,) = cur.unpack("I")
        dims = cur.unpack(f"{n_dims}Q")
        ttype, offset = cur.unpack("IQ")
        table.append((name, tuple(int(d) for d in reversed(dims)), ttype, offset))
    align = int(fields.get("general.alignment", 32))
    start = (cur.pos + align - 1) // align * align
    tensors = []
    for name, shape, ttype, offset in table:
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        except (ValueError, KeyError) as exc:
            raise ValueError(f"tensor {name} has unknown ggml type {ttype}") from exc
        row_bytes = shape[-1] // block * type_size
        rows = int(np.prod(shape[:-1], dtype=np.int64))
        begin = start + offset
        end = begin + rows * row_bytes
        if end > len(mm):
            raise ValueError(f"tensor {name} runs past the end of the file ({end:,} > {len(mm):,} bytes): truncated")
        tensors.append(GGUFTensor(name, shape, ttype, mm[begin:end].reshape(*shape[:-1], row_bytes)))
    return GGUFFile(path, fields, tensors)
