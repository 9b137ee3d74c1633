"""Read dataset files into rows: JSONL, JSON, CSV/TSV and Parquet.

Every reader yields (source, row) pairs, where source ("data.jsonl:41") names the row in errors and stats.
JSONL, CSV/TSV and Parquet stream, so files larger than memory can be read; a JSON list is decoded whole
(convert big ones to JSONL).
"""

import csv
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from velotune.errors import DataError

Rows = Iterator[tuple[str, dict]]

_REENCODE = "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 in.jsonl > out.jsonl)"


def _check_object(row: object, source: str) -> dict:
    if not isinstance(row, dict):
        raise DataError(f"{source}: expected a JSON object with named fields, found {type(row).__name__}")
    return row


def _decode(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 (byte {e.start}: {e.reason}); {_REENCODE}") from e


def read_jsonl(path: str) -> Rows:
    """One JSON object per line; blank lines are skipped."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            source = f"{path}:{number}"
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{source}: not valid UTF-8 (column {e.start + 1}: {e.reason}); {_REENCODE}") from e
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{source}: not valid JSON ({e.msg} at column {e.colno})") from e
            yield source, _check_object(row, source)


def read_json(path: str) -> Rows:
    """A JSON list of objects; a file of one object per line (JSONL named .json) is read as JSONL."""
    with open(path, "rb") as f:
        text = _decode(f.read(), path)
    start = len(text) - len(text.lstrip())
    if text[start : start + 1] == "{":
        yield from read_jsonl(path)
        return
    if text[start : start + 1] != "[":
        raise DataError(
            f"{path}: expected a JSON list of objects ([{{...}}, ...]) or JSON Lines; "
            f"the file starts with {text[start : start + 20]!r}"
        )
    # Walk the list item by item so every row keeps its line number (counted incrementally: files can be large).
    decoder = json.JSONDecoder()
    counted_to, line = 0, 1

    def line_at(p: int) -> int:
        nonlocal counted_to, line
        line += text.count("\n", counted_to, p)
        counted_to = p
        return line

    def skip(p: int) -> int:
        while p < len(text) and text[p] in " \t\r\n":
            p += 1
        return p

    pos = skip(start + 1)
    if text[pos : pos + 1] == "]":
        return
    while True:
        source = f"{path}:{line_at(pos)}"
        try:
            row, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_at(e.pos)}: not valid JSON ({e.msg})") from e
        yield source, _check_object(row, source)
        pos = skip(pos)
        if text[pos : pos + 1] == "]":
            return
        if text[pos : pos + 1] != ",":
            found = repr(text[pos]) if pos < len(text) else "the end of the file"
            raise DataError(f"{path}:{line_at(pos)}: not valid JSON (expected ',' or ']' after an item, found {found})")
        pos = skip(pos + 1)


def _first_bad_line(path: str) -> tuple[int, UnicodeDecodeError]:
    """The line holding a file's first invalid UTF-8 byte, and the error (for messages; the file is re-read)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as e:
                return number, e
    raise AssertionError(f"{path}: no invalid UTF-8 found on a second read")


def read_csv(path: str, delimiter: str = ",") -> Rows:
    """A header line, then one row per record; every value is text (empty cells read as ""). Streamed."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
            if header is None:
                return
            line = reader.line_num + 1
            for record in reader:
                source = f"{path}:{line}"
                line = reader.line_num + 1
                if not any(cell.strip() for cell in record):
                    continue
                if len(record) != len(header):
                    raise DataError(
                        f"{source}: {len(record)} columns, but the header has {len(header)} ({', '.join(header)}); "
                        f"quote values that contain the delimiter {delimiter!r}"
                    )
                yield source, dict(zip(header, record, strict=True))
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV ({e})") from e
        except UnicodeDecodeError:
            number, e = _first_bad_line(path)
            raise DataError(f"{path}:{number}: not valid UTF-8 (column {e.start + 1}: {e.reason}); {_REENCODE}") from e


def read_tsv(path: str) -> Rows:
    """Tab-separated values, read like CSV."""
    return read_csv(path, delimiter="\t")


def read_parquet(path: str) -> Rows:
    """Parquet via pyarrow, streamed in record batches; rows are named by 1-based row number."""
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise DataError(
            f"{path}: reading Parquet needs pyarrow, which is not installed; run: pip install pyarrow"
        ) from e
    try:
        parquet = pq.ParquetFile(path)
        number = 0
        for batch in parquet.iter_batches(batch_size=1024):
            for row in batch.to_pylist():
                number += 1
                yield f"{path}:row {number}", row
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid/ArrowIOError derive from these
        raise DataError(f"{path}: not a readable Parquet file ({e})") from e


READERS: dict[str, Callable[[str], Rows]] = {
    ".jsonl": read_jsonl,
    ".ndjson": read_jsonl,
    ".json": read_json,
    ".csv": read_csv,
    ".tsv": read_tsv,
    ".parquet": read_parquet,
    ".pq": read_parquet,
}


def read_rows(path: str | os.PathLike) -> Rows:
    """Yield (source, row) for every row of a dataset file, choosing the reader by file extension."""
    path = os.fspath(path)
    reader = READERS.get(Path(path).suffix.lower())
    if reader is None:
        raise DataError(
            f"{path}: unknown file type {Path(path).suffix or '(no extension)'!r}; expected one of "
            f"{', '.join(READERS)}; rename the file or convert it to JSONL"
        )
    if not os.path.exists(path):
        raise DataError(f"{path}: file not found (working directory: {os.getcwd()}); check the path")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory; give one data file (.jsonl, .json, .csv, .parquet)")
    return reader(path)
