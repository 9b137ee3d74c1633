"""Run configuration: one flat mapping of keys (HF TrainingArguments / PEFT names) split into typed sections.

A YAML file and `--key value` overrides both become this mapping; every key is checked, unknown keys get a
"did you mean" suggestion, and values are coerced to the field's type with an error naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from velotune.data import DataConfig
from velotune.errors import ConfigError
from velotune.lora.apply import LoRAConfig

SCHEDULERS = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "sgd")
DTYPES = ("auto", "float32", "bfloat16", "float16")
FINETUNING = ("lora", "full")
PACKAGE_DATA = Path(__file__).resolve().parents[1] / "datasets"


@dataclass
class TrainConfig:
    """The training part of a run; names follow transformers.TrainingArguments."""

    model_name_or_path: str | None = None  # None: the embedded SmolLM2-135M-Instruct
    output_dir: str | None = None  # None: runs/<model>-<timestamp>
    finetuning: str = "lora"  # lora | full
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    load_in_4bit: bool = False  # NF4 base weights (QLoRA); bitsandbytes 4-bit checkpoints load as stored
    load_in_8bit: bool = False  # int8 base weights
    learning_rate: float = 2e-4
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_steps: int = -1
    num_train_epochs: float = 1.0
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    lr_scheduler_type: str = "cosine"
    optim: str = "adamw_torch"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    logging_steps: int = 1
    seed: int = 3407
    gradient_checkpointing: bool | str = True  # true | false | offload (saved layer inputs kept in host memory)
    save_merged: bool = False  # also write the merged 16-bit model in Hugging Face layout
    compare_samples: int = 24  # held-out rows scored before and after training (0 disables)
    max_new_tokens: int = 32  # generation length for the before/after comparison
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    @property
    def quantization(self) -> str | None:
        return "nf4" if self.load_in_4bit else "int8" if self.load_in_8bit else None

    def __post_init__(self) -> None:
        _choice("lr_scheduler_type", self.lr_scheduler_type, SCHEDULERS)
        _choice("optim", self.optim, OPTIMIZERS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("finetuning", self.finetuning, FINETUNING)
        for name in ("per_device_train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.gradient_checkpointing not in (True, False, "offload"):
            raise ConfigError(f"gradient_checkpointing: {self.gradient_checkpointing!r}; use true, false or offload")
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("load_in_4bit and load_in_8bit are both set; choose one")
        if (self.load_in_4bit or self.load_in_8bit) and self.finetuning == "full":
            raise ConfigError("full fine-tuning needs 16-bit weights; drop load_in_4bit/load_in_8bit or use LoRA")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("set max_steps or num_train_epochs to a positive value")


def _choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{key}: {value!r} is not valid; choose one of: {', '.join(valid)}")


@dataclass
class RunConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_flat(self) -> dict[str, Any]:
        """The resolved config as the flat mapping a YAML file would hold."""
        out = {}
        for key, (section, name) in KEYS.items():
            if key in ALIASES:
                continue
            out[key] = getattr(getattr(self, section), name)
        return out


# flat key -> (section, field); the LoRA and data keys carry PEFT / common SFT names
KEYS: dict[str, tuple[str, str]] = {f.name: ("train", f.name) for f in dataclasses.fields(TrainConfig)}
KEYS.update(
    {
        "lora_r": ("lora", "r"),
        "lora_alpha": ("lora", "lora_alpha"),
        "lora_dropout": ("lora", "lora_dropout"),
        "target_modules": ("lora", "target_modules"),
        "use_rslora": ("lora", "use_rslora"),
        "dataset": ("data", "path"),
        "dataset_format": ("data", "format"),
        "eval_dataset": ("data", "eval_path"),
        "eval_split": ("data", "eval_split"),
        "max_seq_length": ("data", "max_seq_length"),
        "train_on": ("data", "train_on"),
        "too_long": ("data", "too_long"),
        "packing": ("data", "packing"),
        "chat_template": ("data", "template"),
        "system_prompt": ("data", "system_prompt"),
        "field_map": ("data", "field_map"),
    }
)
ALIASES = {"model": "model_name_or_path", "r": "lora_r", "lora_target_modules": "target_modules"}
KEYS.update({alias: KEYS[target] for alias, target in ALIASES.items()})
SECTIONS = {"train": TrainConfig, "lora": LoRAConfig, "data": DataConfig}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Value converted to the field's type, or a ConfigError naming the key and the expected type."""
    is_union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    args = typing.get_args(annotation) if is_union else ()
    if value is None and type(None) in args:
        return None
    kinds = [a for a in args if a is not type(None)] or [annotation]
    for kind in kinds:
        try:
            return _coerce_one(value, kind)
        except (TypeError, ValueError):
            continue
    names = " or ".join(getattr(typing.get_origin(k) or k, "__name__", str(k)) for k in kinds)
    raise ConfigError(f"{key}: expected {names}, got {value!r}")


def _coerce_one(value: Any, kind: Any) -> Any:
    base = typing.get_origin(kind) or kind
    if base is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
        raise ValueError
    if base is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError
        return int(value)
    if base is float:
        if isinstance(value, bool):
            raise ValueError
        return float(value)
    if base is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError
        return str(value)
    if base is list:
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        return [str(v).strip() for v in items]
    if base is dict:
        if not isinstance(value, dict):
            raise ValueError
        return value
    return value


def run_config_from_dict(values: dict[str, Any], source: str = "config") -> RunConfig:
    """Build a RunConfig from a flat mapping; unknown keys and bad values raise ConfigError."""
    parts: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in values.items():
        if key not in KEYS:
            close = difflib.get_close_matches(key, list(KEYS), n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else "; run `velotune train --help` for the keys"
            raise ConfigError(f"{source}: unknown key {key!r}{hint}")
        section, name = KEYS[key]
        ann = typing.get_type_hints(SECTIONS[section])[name]
        parts[section][name] = _coerce(key, value, ann)
    return RunConfig(**{s: SECTIONS[s](**kw) for s, kw in parts.items()})


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def with_defaults(values: dict[str, Any]) -> dict[str, Any]:
    """Without a dataset, the run trains the bundled ISO-date task (the demo that `velotune train` runs)."""
    out = dict(values)
    if "dataset" not in out:
        out["dataset"] = str(PACKAGE_DATA / "iso_dates.jsonl")
        out.setdefault("eval_dataset", str(PACKAGE_DATA / "iso_dates_eval.jsonl"))
        out.setdefault("max_steps", 30)
        out.setdefault("gradient_checkpointing", False)  # CPU demo: memory is plentiful, recompute is not free
        out.setdefault("max_new_tokens", 16)
        out.setdefault("per_device_train_batch_size", 8)
        out.setdefault("learning_rate", 1e-3)
        out.setdefault("warmup_steps", 5)
        out.setdefault("max_seq_length", 256)
    return out
