"""DataConfig: which file to read, how to read it and how to turn it into training examples."""

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from velotune.data.formats import CANONICAL_FIELDS, FORMATS
from velotune.data.templates import TEMPLATE_NAMES
from velotune.errors import ConfigError

FORMAT_CHOICES = ("auto", *FORMATS)
TRAIN_ON_CHOICES = ("responses", "all")
TOO_LONG_CHOICES = ("truncate", "drop", "fail")


def _choice(key: str, value: object, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}: {value!r} is not valid; choose one of: {', '.join(choices)}")


def _optional_path(key: str, value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise ConfigError(
            f"{key} is {value!r}; expected the path of a .jsonl, .json, .csv or .parquet file (or a Hugging Face "
            f"dataset directory or hub name)"
        )
    return value


def _optional_dir(key: str, value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} is {value!r}; expected a directory path")
    return value


def setting(default: Any, help: str, choices: Sequence[str] = ()) -> Any:
    """A config field with the line `velotune train --help` shows for it, and its allowed values when they are a
    fixed set (the defaults shown come from the field itself)."""
    metadata = {"help": help, "choices": tuple(choices)}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.copy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class DataConfig:
    """Where the training data lives and how it becomes tokenized examples; every value is checked on creation.

    Messages name the flat config keys users write (dataset, dataset_format, chat_template, ...), which
    velotune.train.config maps to these fields.
    """

    path: str | None = setting(
        None,
        "training data: a .jsonl/.json/.csv/.parquet file, a datasets save_to_disk directory or a hub name "
        "(unset: the bundled ISO-date demo)",
    )
    format: str = setting("auto", "row format (auto: detected from the first row's fields)", FORMAT_CHOICES)
    eval_path: str | None = setting(None, "held-out data for eval loss and perplexity, a file like dataset")
    eval_split: float = setting(0.0, "fraction of the dataset's rows held out for evaluation (instead of eval_dataset)")
    max_seq_length: int = setting(2048, "longest example in tokens; longer rows follow too_long")
    train_on: str = setting("responses", "tokens the loss is taken on: the assistant turns, or all", TRAIN_ON_CHOICES)
    too_long: str = setting(
        "truncate", "rows longer than max_seq_length are cut, dropped, or stop the run", TOO_LONG_CHOICES
    )
    packing: bool = setting(False, "pack several rows into each max_seq_length sequence")
    template: str | None = setting(None, "built-in chat template to use instead of the tokenizer's own", TEMPLATE_NAMES)
    system_prompt: str | None = setting(None, "system message for rows that have none")
    field_map: dict[str, str] = setting({}, "rename your fields to the format's names, e.g. {question: instruction}")
    seed: int = 0  # of the eval_split hold-out and the padding figures' batch shuffle; not a config key
    split: str | None = setting(None, "split to read when dataset is a Hugging Face dataset (unset: train)")
    cache: bool = setting(True, "keep tokenized data on disk, keyed by file content, tokenizer and data settings")
    cache_dir: str | None = setting(
        None, "where the tokenized cache lives (unset: $VELOTUNE_CACHE/tokenized, else ~/.cache/velotune/tokenized)"
    )
    num_proc: int = setting(1, "processes that render and tokenize rows (1: this one; the tokenizer uses every core)")

    def __post_init__(self) -> None:
        self.path = _optional_path("dataset", self.path)
        self.eval_path = _optional_path("eval_dataset", self.eval_path)
        self.cache_dir = _optional_dir("dataset_cache_dir", self.cache_dir)
        _choice("dataset_format", self.format, FORMAT_CHOICES)
        _choice("train_on", self.train_on, TRAIN_ON_CHOICES)
        _choice("too_long", self.too_long, TOO_LONG_CHOICES)
        if self.template is not None:
            _choice("chat_template", self.template, TEMPLATE_NAMES)
        if (
            isinstance(self.eval_split, bool)
            or not isinstance(self.eval_split, int | float)
            or not 0.0 <= self.eval_split < 1.0
        ):
            raise ConfigError(f"eval_split is {self.eval_split!r}; expected a fraction in [0, 1), e.g. 0.05")
        if self.eval_split > 0 and self.eval_path is not None:
            raise ConfigError(
                f"eval_split is {self.eval_split} and eval_dataset is set; use one: eval_dataset for a separate "
                f"file, or eval_split to hold out part of the dataset"
            )
        if isinstance(self.max_seq_length, bool) or not isinstance(self.max_seq_length, int) or self.max_seq_length < 2:
            raise ConfigError(f"max_seq_length is {self.max_seq_length!r}; expected a whole number >= 2")
        if not isinstance(self.packing, bool):
            raise ConfigError(f"packing is {self.packing!r}; expected true or false")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ConfigError(f"system_prompt is {type(self.system_prompt).__name__}; expected text")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"DataConfig.seed is {self.seed!r}; expected a whole number")
        if self.split is not None and (not isinstance(self.split, str) or not self.split):
            raise ConfigError(f"dataset_split is {self.split!r}; expected a split name such as train or test")
        if not isinstance(self.cache, bool):
            raise ConfigError(f"dataset_cache is {self.cache!r}; expected true or false")
        if isinstance(self.num_proc, bool) or not isinstance(self.num_proc, int) or self.num_proc < 1:
            raise ConfigError(f"dataset_num_proc is {self.num_proc!r}; expected a whole number >= 1")
        self._check_field_map()

    def _check_field_map(self) -> None:
        if not isinstance(self.field_map, dict):
            raise ConfigError(
                f"field_map is {type(self.field_map).__name__}; expected a mapping your_field: canonical_field, "
                f"e.g. {{question: instruction}}"
            )
        for source, target in self.field_map.items():
            if not isinstance(source, str) or not isinstance(target, str):
                raise ConfigError(f"field_map entry {source!r}: {target!r}; names must be text")
            if target not in CANONICAL_FIELDS:
                raise ConfigError(
                    f"field_map maps {source!r} to {target!r}, which no format reads; map to one of: "
                    f"{', '.join(CANONICAL_FIELDS)}"
                )
