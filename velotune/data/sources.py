"""Data sources: what data.path names (a file, a saved Hugging Face dataset, a hub dataset) as rows plus identity."""

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from velotune.data import hf_datasets
from velotune.data.cache import file_fingerprint, files_fingerprint
from velotune.data.readers import Rows, read_rows
from velotune.errors import ConfigError, DataError


@dataclass
class RowSource:
    """Rows to tokenize: `path` names them in messages, `rows()` reads them (again on every call), and
    `fingerprint(cache_root)` identifies their content for the cache (None: not cacheable)."""

    path: str
    rows: Callable[[], Rows]
    fingerprint: Callable[[Path], str | None]


def open_source(path: str, split: str | None = None, for_eval: bool = False) -> RowSource:
    """The source data.path (or eval_path) names; `split` picks a split of a Hugging Face dataset."""
    if os.path.isdir(path) and not hf_datasets.is_saved_dataset(path):
        raise DataError(
            f"{path}: is a directory; data.path must name one file (.jsonl, .json, .csv, .parquet) or a directory "
            f"written by datasets' save_to_disk"
        )
    if hf_datasets.is_saved_dataset(path) or hf_datasets.looks_like_hub_name(path):
        dataset, name = hf_datasets.load(path, split, for_eval)
        files = hf_datasets.cache_files(dataset)
        return RowSource(
            path,
            lambda: hf_datasets.rows(dataset, path, name),
            lambda root: f"{name}:{files_fingerprint(files)}" if files else None,
        )
    if split is not None:
        raise ConfigError(
            f"data.split is {split!r}, but {path} is a file; split picks a split of a Hugging Face dataset "
            f"(a save_to_disk directory or hub name); remove it"
        )
    read_rows(path)  # checks the file type and that it exists, now rather than when first read
    return RowSource(path, lambda: read_rows(path), lambda root: file_fingerprint(path, root))
