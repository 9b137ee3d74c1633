"""Data sources: what a dataset setting names (a file, a saved Hugging Face dataset, a hub dataset) as rows and an
identity for the cache."""

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from velotune.data import hf_datasets
from velotune.data.cache import file_fingerprint, files_fingerprint
from velotune.data.config import DataConfig
from velotune.data.formats import apply_field_map, detect_format, to_messages
from velotune.data.readers import Rows, read_rows
from velotune.errors import ConfigError, DataError

CHECK_ROWS = 16  # rows check_file reads: enough to catch a wrong format, few enough to take milliseconds


@dataclass
class RowSource:
    """Rows to tokenize: `path` names them in messages, `rows()` reads them (again on every call), and
    `fingerprint(cache_root)` identifies their content for the cache (None: not cacheable)."""

    path: str
    rows: Callable[[], Rows]
    fingerprint: Callable[[Path], str | None]


def open_source(path: str, split: str | None = None, for_eval: bool = False) -> RowSource:
    """The source a dataset (or eval_dataset) path names; `split` picks a split of a Hugging Face dataset."""
    if os.path.isdir(path) and not hf_datasets.is_saved_dataset(path):
        raise DataError(
            f"{path}: is a directory; give one data file (.jsonl, .json, .csv, .parquet) or a directory written "
            f"by datasets' save_to_disk"
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
            f"dataset_split is {split!r}, but {path} is a file; dataset_split picks a split of a Hugging Face dataset "
            f"(a save_to_disk directory or hub name); remove it"
        )
    read_rows(path)  # checks the file type and that it exists, now rather than when first read
    return RowSource(path, lambda: read_rows(path), lambda root: file_fingerprint(path, root))


def check_file(path: str, cfg: DataConfig, for_eval: bool = False) -> str | None:
    """Read the first rows of a local data file as training will and return their format: a missing, empty or
    malformed file, or rows without the fields of their format, raise here in milliseconds, before a model loads.
    None for a Hugging Face dataset (a save_to_disk directory or a hub name), which training reads itself."""
    if hf_datasets.is_saved_dataset(path) or hf_datasets.looks_like_hub_name(path):
        return None
    rows = open_source(path, None if for_eval else cfg.split, for_eval).rows()
    try:
        first = next(rows, None)
        if first is None:
            raise DataError(f"{path}: no rows found; the file is empty (or holds only blank lines)")
        source, row = first
        fmt = cfg.format if cfg.format != "auto" else detect_format(apply_field_map(row, cfg.field_map), source)
        for source, row in itertools.chain([first], itertools.islice(rows, CHECK_ROWS - 1)):
            to_messages(apply_field_map(row, cfg.field_map), fmt, source)
    finally:
        getattr(rows, "close", lambda: None)()  # the reader's file
    return fmt


def check_files(cfg: DataConfig) -> None:
    """check_file on the training data and the eval data, when they are local files."""
    if cfg.path is not None:
        check_file(cfg.path, cfg)
    if cfg.eval_path is not None:
        check_file(cfg.eval_path, cfg, for_eval=True)
