"""Tokenized rows on disk: flat token arrays plus one entry per row read, memory-mapped when read back.

A store is a directory of raw little-endian arrays and a meta.json written last (its presence marks the store
complete). Per row read, in file order: status (used or why dropped), length before truncation, tokens kept,
target tokens, and the row's number (its line, or row index), from which its name "file:line" is rebuilt, so
a store does not depend on the path the file had when it was tokenized. Per token of the used rows: the id, and
1 where the token is a target (its label is its id; elsewhere IGNORE). ~3 bytes a token with a vocabulary below
65,536 ids, 4 more with a larger one; 21 bytes a row.
"""

import json
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from velotune.data.encode import USED, Encoded
from velotune.data.masking import IGNORE

ROW_ARRAYS = {"status": np.int8, "length": np.int32, "kept": np.int32, "targets": np.int32, "number": np.int64}
TOKEN_ARRAYS = ("ids", "mask")
_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def id_dtype_for(tokenizer) -> np.dtype:
    """uint16 when every id fits (vocabularies up to 65,536 tokens), else int32."""
    try:
        size = len(tokenizer)
    except TypeError:
        return np.dtype(np.int32)
    return np.dtype(np.uint16 if size <= 1 << 16 else np.int32)


class StoreWriter:
    """Appends tokenized chunks to a store directory; `finish` writes meta.json, making the store complete."""

    def __init__(self, directory: Path, id_dtype: np.dtype) -> None:
        self.directory, self.id_dtype = directory, np.dtype(id_dtype)
        directory.mkdir(parents=True, exist_ok=True)
        names = [*ROW_ARRAYS, *TOKEN_ARRAYS]
        self.files = {name: open(directory / f"{name}.bin", "wb") for name in names}
        self.rows = self.tokens = 0
        self.prefix: str | None = None  # row names are prefix + number
        self.odd_names: dict[int, str] = {}  # rows whose names do not follow that pattern

    def _numbers(self, sources: list[str]) -> np.ndarray:
        if self.prefix is None and sources:
            match = _NUMBERED.match(sources[0])
            self.prefix = match.group(1) if match else ""
        prefix, cut = self.prefix, len(self.prefix or "")
        numbers = np.full(len(sources), -1, dtype=np.int64)
        for i, source in enumerate(sources):
            tail = source[cut:]
            if source.startswith(prefix) and tail.isascii() and tail.isdigit():
                numbers[i] = int(tail)
            else:
                self.odd_names[self.rows + i] = source
        return numbers

    def append(self, chunk: Encoded) -> None:
        """Write one chunk's rows and tokens."""
        arrays = {
            "status": chunk.status,
            "length": chunk.length,
            "kept": chunk.kept,
            "targets": chunk.targets,
            "number": self._numbers(chunk.sources),
            "ids": chunk.ids,
            "mask": chunk.mask,
        }
        for name, array in arrays.items():
            dtype = self.id_dtype if name == "ids" else (np.uint8 if name == "mask" else ROW_ARRAYS[name])
            self.files[name].write(np.ascontiguousarray(array, dtype=np.dtype(dtype).newbyteorder("<")).tobytes())
        self.rows += len(chunk.sources)
        self.tokens += len(chunk.ids)

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def finish(self, meta: dict, path: str) -> None:
        """Close the arrays and write meta.json; row names are stored relative to `path`."""
        self.close()
        prefix = self.prefix or ""
        relative = prefix.startswith(path)
        meta = {
            **meta,
            "rows": self.rows,
            "tokens": self.tokens,
            "id_dtype": self.id_dtype.str,
            "row_prefix": prefix[len(path) :] if relative else prefix,
            "row_prefix_relative": relative,
            "odd_names": {str(k): v for k, v in self.odd_names.items()},
        }
        tmp = self.directory / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
        os.replace(tmp, self.directory / "meta.json")


def _map(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    dtype = np.dtype(dtype).newbyteorder("<")
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


class TokenStore:
    """The tokenized rows of one data source, memory-mapped: a row's arrays are read from disk when asked for."""

    def __init__(self, directory: Path, path: str) -> None:
        self.directory = directory
        self.meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        rows, tokens = self.meta["rows"], self.meta["tokens"]
        for name, dtype in ROW_ARRAYS.items():
            setattr(self, name, _map(directory / f"{name}.bin", dtype, rows))
        self.ids = _map(directory / "ids.bin", np.dtype(self.meta["id_dtype"]), tokens)
        self.mask = _map(directory / "mask.bin", np.uint8, tokens)
        self.rows_read = rows
        self.format: str = self.meta["format"]
        self.path = path
        self.prefix = (path if self.meta["row_prefix_relative"] else "") + self.meta["row_prefix"]
        self.odd_names = {int(k): v for k, v in self.meta["odd_names"].items()}
        self.used_rows = np.flatnonzero(self.status == USED)  # [U] row of each example
        self.offsets = np.zeros(len(self.used_rows) + 1, dtype=np.int64)  # [U + 1] start of each example's tokens
        np.cumsum(self.kept[self.used_rows], out=self.offsets[1:])
        assert self.offsets[-1] == tokens, f"{directory}: {self.offsets[-1]} tokens kept but {tokens} stored"

    def name(self, row: int) -> str:
        """The name ("file:line") of row `row` (an index into the rows read)."""
        odd = self.odd_names.get(row)
        return odd if odd is not None else f"{self.prefix}{self.number[row]}"

    def example(self, k: int) -> dict:
        """Example `k` (an index into the used rows) as {"input_ids", "labels", "row"} of plain lists."""
        start, end = self.offsets[k], self.offsets[k + 1]
        ids = self.ids[start:end].astype(np.int64)
        labels = np.where(self.mask[start:end] != 0, ids, IGNORE)
        return {"input_ids": ids.tolist(), "labels": labels.tolist(), "row": self.name(int(self.used_rows[k]))}

    def example_lengths(self) -> np.ndarray:
        """Tokens of every example, [U]."""
        return np.diff(self.offsets)


class ExampleArrays(Sequence[dict]):
    """Examples of a store (a subset of them, in order) as a sequence of {"input_ids", "labels", "row"} dicts."""

    def __init__(self, store: TokenStore, index: np.ndarray) -> None:
        self.store = store
        self.index = np.asarray(index, dtype=np.int64)  # [n] positions among the store's examples

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int | slice) -> dict | list[dict]:
        if isinstance(i, slice):
            return [self.store.example(int(k)) for k in self.index[i]]
        return self.store.example(int(self.index[i]))

    def __iter__(self) -> Iterator[dict]:
        return (self.store.example(int(k)) for k in self.index)

    @property
    def lengths(self) -> np.ndarray:
        """Token count of each example, [n]."""
        return self.store.example_lengths()[self.index]
