"""Rows from Hugging Face `datasets`: a directory written by save_to_disk, or a dataset on the hub.

Optional: only used when data.path names one of those, and `datasets` is imported only then. Rows are named
"<path>[<split>]:row N" (1-based), like the rows of a file.
"""

import os
import re
from collections.abc import Iterator
from pathlib import Path

from velotune.data.readers import READERS
from velotune.errors import ConfigError, DataError

# Files save_to_disk writes: a Dataset (state.json, dataset_info.json) or a DatasetDict (dataset_dict.json).
SAVED_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
EVAL_SPLITS = ("validation", "test")
BATCH = 1024


def is_saved_dataset(path: str) -> bool:
    """True for a directory written by `datasets`' save_to_disk."""
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, m)) for m in SAVED_MARKERS)


def looks_like_hub_name(path: str) -> bool:
    """True for "owner/name" that is not a local path (no such file, no file extension we read)."""
    return not os.path.exists(path) and bool(HUB_NAME.match(path)) and Path(path).suffix.lower() not in READERS


def _datasets(path: str, what: str):
    try:
        import datasets
    except ImportError as e:
        raise DataError(
            f"{path}: {what} needs the `datasets` package, which is not installed; run: pip install datasets "
            f"(or convert the data to a .jsonl or .parquet file)"
        ) from e
    return datasets


def _pick_split(found, path: str, split: str | None, for_eval: bool):
    """The Dataset of `split` (default: train; for eval: validation, else test) from a Dataset or DatasetDict."""
    if not hasattr(found, "keys"):  # a single Dataset
        return found, split or "train"
    names = list(found.keys())
    wanted = [split] if split else (list(EVAL_SPLITS) if for_eval else ["train"])
    for name in wanted:
        if name in names:
            return found[name], name
    raise ConfigError(
        f"{path}: no split {' or '.join(wanted)}; the dataset has: {', '.join(names)}; set dataset_split to one of them"
    )


def load(path: str, split: str | None, for_eval: bool = False):
    """(Dataset, split name) for a save_to_disk directory or a hub name; DataError naming what went wrong."""
    if is_saved_dataset(path):
        datasets = _datasets(path, "reading a saved Hugging Face dataset")
        try:
            found = datasets.load_from_disk(path)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable saved dataset ({type(e).__name__}: {e})") from e
        return _pick_split(found, path, split, for_eval)
    datasets = _datasets(path, "reading a Hugging Face hub dataset")
    try:
        found = datasets.load_dataset(path)
    except (OSError, ValueError) as e:  # ConnectionError, offline mode and not-found errors derive from these
        raise DataError(
            f"{path}: no such local file, and loading it as a Hugging Face hub dataset failed "
            f"({type(e).__name__}: {e}); check the name and your network (offline: HF_DATASETS_OFFLINE=1 reads "
            f"only datasets already downloaded), or give the path of a local file"
        ) from e
    return _pick_split(found, path, split, for_eval)


def rows(dataset, path: str, split: str) -> Iterator[tuple[str, dict]]:
    """(source, row) for every row, read in batches (Arrow data stays memory-mapped)."""
    number = 0
    for batch in dataset.iter(batch_size=BATCH):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns), strict=True):
            number += 1
            yield f"{path}[{split}]:row {number}", dict(zip(columns, values, strict=True))


def cache_files(dataset) -> list[str]:
    """The Arrow files behind a dataset (empty for one held in memory)."""
    return [f["filename"] for f in getattr(dataset, "cache_files", []) or []]
