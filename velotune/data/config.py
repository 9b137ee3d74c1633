"""DataConfig: which file to read, how to read it and how to turn it into training examples."""

import os
from dataclasses import dataclass, field

from velotune.data.formats import CANONICAL_FIELDS, FORMATS
from velotune.data.templates import TEMPLATE_NAMES
from velotune.errors import ConfigError

FORMAT_CHOICES = ("auto", *FORMATS)
TRAIN_ON_CHOICES = ("responses", "all")
TOO_LONG_CHOICES = ("truncate", "drop", "fail")


def _choice(key: str, value: object, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise ConfigError(f"data.{key} is {value!r}; expected one of: {', '.join(choices)}")


def _optional_path(key: str, value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise ConfigError(
            f"data.{key} is {value!r}; expected the path of a .jsonl, .json, .csv or .parquet file (or a "
            f"Hugging Face dataset directory or hub name)"
        )
    return value


def _optional_dir(key: str, value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"data.{key} is {value!r}; expected a directory path")
    return value


@dataclass
class DataConfig:
    """Where the training data lives and how it becomes tokenized examples; every value is checked on creation."""

    path: str | None = None  # JSONL / JSON / CSV / Parquet file, a `datasets` save_to_disk directory, or a hub name
    format: str = "auto"  # auto | alpaca | sharegpt | messages | prompt_completion | text | reasoning
    eval_path: str | None = None
    eval_split: float = 0.0  # fraction held out from `path` when no eval_path (deterministic, seeded)
    max_seq_length: int = 2048
    train_on: str = "responses"  # responses (assistant turns only) | all
    too_long: str = "truncate"  # truncate | drop | fail
    packing: bool = False
    template: str | None = None  # built-in template name, overrides the tokenizer's chat template
    system_prompt: str | None = None  # used for rows that have no system message
    field_map: dict[str, str] = field(default_factory=dict)  # user's field name -> canonical name
    seed: int = 0
    split: str | None = None  # split to read when path is a Hugging Face dataset (default: train)
    cache: bool = True  # keep tokenized data on disk, keyed by file content, tokenizer and the settings above
    cache_dir: str | None = None  # default: $VELOTUNE_CACHE/tokenized, else ~/.cache/velotune/tokenized
    num_proc: int = 1  # processes that render and tokenize; 1: this one (the tokenizer still uses every core)

    def __post_init__(self) -> None:
        self.path = _optional_path("path", self.path)
        self.eval_path = _optional_path("eval_path", self.eval_path)
        self.cache_dir = _optional_dir("cache_dir", self.cache_dir)
        _choice("format", self.format, FORMAT_CHOICES)
        _choice("train_on", self.train_on, TRAIN_ON_CHOICES)
        _choice("too_long", self.too_long, TOO_LONG_CHOICES)
        if self.template is not None:
            _choice("template", self.template, TEMPLATE_NAMES)
        if (
            isinstance(self.eval_split, bool)
            or not isinstance(self.eval_split, int | float)
            or not 0.0 <= self.eval_split < 1.0
        ):
            raise ConfigError(f"data.eval_split is {self.eval_split!r}; expected a fraction in [0, 1), e.g. 0.05")
        if self.eval_split > 0 and self.eval_path is not None:
            raise ConfigError(
                f"data.eval_split is {self.eval_split} and data.eval_path is set; use one: eval_path for a separate "
                f"file, or eval_split to hold out part of data.path"
            )
        if isinstance(self.max_seq_length, bool) or not isinstance(self.max_seq_length, int) or self.max_seq_length < 2:
            raise ConfigError(f"data.max_seq_length is {self.max_seq_length!r}; expected a whole number >= 2")
        if not isinstance(self.packing, bool):
            raise ConfigError(f"data.packing is {self.packing!r}; expected true or false")
        if self.system_prompt is not None and not isinstance(self.system_prompt, str):
            raise ConfigError(f"data.system_prompt is {type(self.system_prompt).__name__}; expected text")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"data.seed is {self.seed!r}; expected a whole number")
        if self.split is not None and (not isinstance(self.split, str) or not self.split):
            raise ConfigError(f"data.split is {self.split!r}; expected a split name such as train or test")
        if not isinstance(self.cache, bool):
            raise ConfigError(f"data.cache is {self.cache!r}; expected true or false")
        if isinstance(self.num_proc, bool) or not isinstance(self.num_proc, int) or self.num_proc < 1:
            raise ConfigError(f"data.num_proc is {self.num_proc!r}; expected a whole number >= 1")
        self._check_field_map()

    def _check_field_map(self) -> None:
        if not isinstance(self.field_map, dict):
            raise ConfigError(
                f"data.field_map is {type(self.field_map).__name__}; expected a mapping your_field: canonical_field, "
                f"e.g. {{question: instruction}}"
            )
        for source, target in self.field_map.items():
            if not isinstance(source, str) or not isinstance(target, str):
                raise ConfigError(f"data.field_map entry {source!r}: {target!r}; names must be text")
            if target not in CANONICAL_FIELDS:
                raise ConfigError(
                    f"data.field_map maps {source!r} to {target!r}, which no format reads; map to one of: "
                    f"{', '.join(CANONICAL_FIELDS)}"
                )
