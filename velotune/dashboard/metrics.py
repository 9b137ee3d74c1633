"""metrics.jsonl read as it grows: complete lines only, malformed ones skipped and counted, never a crash."""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import Any

TAIL = 64  # bytes before the read position compared on each refresh: a rewritten file is read again from the start


class MetricsFile:
    """The rows of one metrics.jsonl, read incrementally: each refresh reads only the bytes added since the last.

    A line without its newline yet (the trainer is writing it) waits for the next refresh; a complete line that
    is not a JSON object with a step is skipped and counted in `bad_lines`. A file that shrank or was rewritten
    (a resumed run copies its checkpoint's metrics back) is read again from the start and `generation` goes up,
    so readers holding an index know to start over.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        self.bad_lines = 0
        self.generation = 0
        self.pending = False  # bytes after the last newline: a line still being written
        self._offset = 0
        self._tail = b""
        self._lock = threading.Lock()

    def refresh(self) -> MetricsFile:
        with self._lock:
            try:
                with open(self.path, "rb") as f:
                    self._read(f)
            except FileNotFoundError:
                if self._offset:
                    self._reset()
            except OSError:  # a directory of that name, no permission: nothing to read, as if absent
                pass
        return self

    def _reset(self) -> None:
        self.rows, self.bad_lines, self.pending = [], 0, False
        self._offset, self._tail = 0, b""
        self.generation += 1

    def _read(self, f: Any) -> None:
        size = f.seek(0, 2)
        if self._offset:
            f.seek(self._offset - len(self._tail))
            if size < self._offset or f.read(len(self._tail)) != self._tail:
                self._reset()
        f.seek(self._offset)
        data = f.read(size - self._offset)
        end = data.rfind(b"\n")
        self.pending = bool(data[end + 1 :].strip())
        if end < 0:
            return
        for line in data[:end].split(b"\n"):
            if line.strip():
                self._add(line)
        self._offset += end + 1
        self._tail = data[max(0, end + 1 - TAIL) : end + 1]

    def _add(self, line: bytes) -> None:
        try:
            row = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            self.bad_lines += 1
            return
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            self.bad_lines += 1
            return
        self.rows.append(row)

    def since(self, index: int) -> list[dict[str, Any]]:
        """Rows from `index` on, with non-finite numbers as None (JSON has no NaN)."""
        with self._lock:
            return [finite(row) for row in self.rows[index:]]


def finite(value: Any) -> Any:
    """`value` as strict JSON: every NaN / infinity inside it None, anything JSON has no type for (a date in a
    hand-edited YAML file) its text."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int | bool):
        return value
    if isinstance(value, dict):
        return {k if isinstance(k, str | int) else str(k): finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return str(value)


def is_train_row(row: dict[str, Any]) -> bool:
    return isinstance(row.get("loss"), int | float) and "skipped" not in row


def numbers(rows: list[dict[str, Any]], key: str) -> list[float]:
    return [row[key] for row in rows if isinstance(row.get(key), int | float) and math.isfinite(row[key])]
