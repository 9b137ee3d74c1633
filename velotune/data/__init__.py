"""Data: turn user files (JSONL, JSON, CSV, Parquet) into tokenized, masked training examples.

Stands alone: imports nothing from velotune except velotune.errors.
"""

from velotune.data.collate import collate
from velotune.data.config import DataConfig
from velotune.data.dataset import DataStats, TokenizedDataset, build_datasets
from velotune.data.formats import FORMATS, detect_format, to_messages
from velotune.data.masking import IGNORE
from velotune.data.templates import BUILTIN_TEMPLATES, TEMPLATE_NAMES, render_prompt

__all__ = [
    "BUILTIN_TEMPLATES",
    "FORMATS",
    "IGNORE",
    "TEMPLATE_NAMES",
    "DataConfig",
    "DataStats",
    "TokenizedDataset",
    "build_datasets",
    "collate",
    "detect_format",
    "render_prompt",
    "to_messages",
]
