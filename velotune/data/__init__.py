"""Data: turn user files (JSONL, JSON, CSV, Parquet, Hugging Face datasets) into tokenized, masked training examples.

Files stream through in chunks, are tokenized in batches (the Rust tokenizer on every core) and land in token
arrays on disk, cached across runs (`DataConfig.cache`, `cache_dir`). Stands alone: imports nothing from velotune
except velotune.errors.
"""

from velotune.data.collate import collate
from velotune.data.config import DataConfig
from velotune.data.dataset import DataStats, TokenizedDataset, build_datasets
from velotune.data.formats import FORMATS, detect_format, to_messages
from velotune.data.masking import IGNORE
from velotune.data.packing import PaddingStats
from velotune.data.preference import (
    PreferenceDataset,
    build_preference_datasets,
    check_preference_file,
    check_preference_files,
    detect_preference,
)
from velotune.data.sources import check_files
from velotune.data.templates import BUILTIN_TEMPLATES, TEMPLATE_NAMES, render_prompt

__all__ = [
    "BUILTIN_TEMPLATES",
    "FORMATS",
    "IGNORE",
    "PaddingStats",
    "PreferenceDataset",
    "TEMPLATE_NAMES",
    "DataConfig",
    "DataStats",
    "TokenizedDataset",
    "build_datasets",
    "build_preference_datasets",
    "check_files",
    "check_preference_file",
    "check_preference_files",
    "collate",
    "detect_format",
    "detect_preference",
    "render_prompt",
    "to_messages",
]
