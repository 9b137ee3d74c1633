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

from velotune import env
from velotune.data import DataConfig
from velotune.data.config import setting
from velotune.errors import ConfigError
from velotune.lora.apply import LoRAConfig

SCHEDULERS = ("cosine", "linear", "constant")
OPTIMIZERS = ("adamw_torch", "adamw_torch_fused", "adamw_8bit", "adafactor", "sgd")
DTYPES = ("auto", "float32", "bfloat16", "float16")
FINETUNING = ("lora", "full", "partial")
REPORT_TO = ("none", "tensorboard", "wandb", "all")
STRATEGIES = ("auto", "ddp", "fsdp")  # distributed.STRATEGIES
METHODS = ("sft", "dpo", "orpo", "simpo", "grpo")  # objectives.METHODS
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")
TRUNCATION_MODES = ("keep_end", "keep_start")
PACKAGE_DATA = Path(__file__).resolve().parents[1] / "datasets"


@dataclass
class TrainConfig:
    """The training part of a run; names follow transformers.TrainingArguments."""

    model_name_or_path: str | None = setting(
        None, "model to fine-tune: HF directory, .gguf file or hub id (unset: the embedded SmolLM2-135M-Instruct)"
    )
    output_dir: str | None = setting(
        None, "run directory for checkpoints, adapter and metrics (unset: runs/<model>-<timestamp>)"
    )
    finetuning: str = setting(
        "lora",
        "what trains: LoRA adapters, every weight, or partial: the top train_layers layers, final norm, lm_head",
        FINETUNING,
    )
    train_layers: float = setting(
        0, "finetuning partial: how many top decoder layers train (>= 1), or a fraction of them (< 1)"
    )
    dtype: str = setting("auto", "precision of weights and compute (auto: bfloat16 on CUDA, float32 on CPU)", DTYPES)
    load_in_4bit: bool = setting(False, "NF4 base weights (QLoRA); bitsandbytes 4-bit checkpoints load as stored")
    load_in_8bit: bool = setting(False, "int8 base weights")
    load_in_fp8: bool = setting(
        False, "FP8 (e4m3) base weights with FP8 matmuls (GPU: compute capability 8.9+); FP8 checkpoints load as stored"
    )
    learning_rate: float = setting(2e-4, "peak learning rate, reached after warm-up")
    per_device_train_batch_size: int = setting(4, "rows per micro-batch on each process")
    gradient_accumulation_steps: int = setting(1, "micro-batches per optimizer step")
    max_steps: int = setting(-1, "optimizer steps to train (-1: num_train_epochs decides)")
    num_train_epochs: float = setting(1.0, "passes over the training rows, when max_steps is -1")
    warmup_steps: int = setting(0, "steps of linear warm-up from 0 to learning_rate")
    warmup_ratio: float = setting(0.0, "warm-up as a fraction of all steps, when warmup_steps is 0")
    lr_scheduler_type: str = setting("cosine", "learning-rate schedule after warm-up", SCHEDULERS)
    optim: str = setting("adamw_torch", "optimizer (adamw_8bit: 8-bit AdamW states)", OPTIMIZERS)
    weight_decay: float = setting(0.0, "AdamW weight decay")
    adam_beta1: float = setting(0.9, "AdamW beta1")
    adam_beta2: float = setting(0.999, "AdamW beta2")
    adam_epsilon: float = setting(1e-8, "AdamW epsilon")
    max_grad_norm: float = setting(1.0, "clip the gradient norm to this (0: no clipping)")
    logging_steps: int = setting(1, "log loss and learning rate every N steps")
    save_steps: int = setting(500, "checkpoint every N steps and at the end (0: no checkpoints)")
    save_total_limit: int = setting(2, "checkpoints kept: the last N, plus the best by eval loss (0: keep all)")
    resume: bool | str = setting(
        False, "true: continue from the latest checkpoint in output_dir; a path: from that checkpoint"
    )
    eval_steps: int = setting(0, "eval loss and perplexity every N steps (0: only at the end)")
    per_device_eval_batch_size: int = setting(8, "rows per evaluation batch on each process")
    early_stopping_patience: int = setting(0, "stop after N evaluations without a lower eval loss (0: never)")
    load_best_model_at_end: bool = setting(
        False, "the adapter / merged model hold the checkpoint with the lowest eval loss"
    )
    max_bad_steps: int = setting(5, "stop after N steps in a row with a non-finite loss or gradient norm")
    auto_batch_size: bool = setting(
        False, "CUDA: lower the micro-batch until a step fits (accumulation makes up the rest)"
    )
    report_to: list[str] = setting([], "also log to these (metrics.jsonl is always written)", REPORT_TO)
    seed: int = setting(3407, "seed of LoRA's initial weights, the data order and dropout")
    gradient_checkpointing: bool | str = setting(
        True,
        "recompute layers in backward to save memory; offload also keeps their saved inputs in host memory",
        ("true", "false", "offload"),
    )
    gradient_checkpointing_layers: float | str = setting(
        1.0,
        "fraction of decoder layers checkpointed (the rest skip the recompute), or auto: the fewest that fit this GPU",
    )
    save_merged: bool = setting(False, "also write the merged 16-bit model in Hugging Face layout")
    compare_samples: int = setting(24, "held-out rows answered before and after training (0: no comparison)")
    max_new_tokens: int = setting(32, "answer length in tokens for the before/after comparison")
    device: str = setting("auto", "auto, cpu, cuda or cuda:N (auto: cuda when available)")
    strategy: str = setting(
        "auto",
        "how --nproc processes share the model: ddp (a copy each) or fsdp (sharded); auto: ddp if it fits each GPU",
        STRATEGIES,
    )
    fsdp_offload_params: bool = setting(
        False, "fsdp: sharded weights, gradients and optimizer state live in host memory"
    )
    method: str = setting(
        "sft",
        "training objective: sft; dpo / orpo / simpo on prompt / chosen / rejected pairs; grpo on prompts + rewards",
        METHODS,
    )
    beta: float | None = setting(
        None,
        "dpo: how far from the reference (smaller: further; default 0.1); orpo: odds-ratio weight; simpo: scale; "
        "grpo: KL weight to the reference (default 0.0: no reference pass)",
    )
    loss_type: str | None = setting(
        None,
        "dpo: the loss on the reward margin (sigmoid, hinge, ipo; default sigmoid); grpo: how token losses are "
        "normalised (grpo, bnpo, dr_grpo, dapo; default dapo)",
    )
    label_smoothing: float = setting(0.0, "dpo / simpo: assumed share of pairs whose preference is flipped (cDPO)")
    simpo_gamma: float = setting(0.5, "simpo: the reward margin aimed for")
    precompute_ref_log_probs: bool = setting(
        False, "dpo: reference log-probs in one pass before training, none per step"
    )
    max_prompt_length: int = setting(
        512, "dpo / orpo / simpo: prompts longer than this are truncated (truncation_mode)"
    )
    truncation_mode: str = setting(
        "keep_end", "keep_end: cut the prompt's start; keep_start: cut its end", TRUNCATION_MODES
    )
    adapter: str | None = setting(
        None, "start from this PEFT adapter (an SFT run dir or its adapter/); dpo: the reference"
    )
    reward_funcs: list[str] | None = setting(
        None, "grpo: reward functions: built-in names or module:function / file.py:function (TRL's signature)"
    )
    reward_weights: list[float] | None = setting(None, "grpo: one weight per reward function (unset: each weighs 1)")
    num_generations: int = setting(8, "grpo: completions sampled per prompt (a group)")
    max_completion_length: int = setting(256, "grpo: most tokens generated per completion")
    temperature: float = setting(1.0, "grpo: sampling temperature (also divides the logits the loss scores)")
    top_p: float = setting(1.0, "grpo: nucleus sampling (1.0: off)")
    top_k: int = setting(0, "grpo: sample among the k most likely tokens (0: off)")
    min_p: float = setting(0.0, "grpo: drop tokens below min_p x the top probability (0: off)")
    repetition_penalty: float = setting(1.0, "grpo: penalty on tokens already in the row (1.0: off)")
    epsilon: float = setting(0.2, "grpo: clipping of the probability ratio, lower side (1 - epsilon)")
    epsilon_high: float | None = setting(None, "grpo: clipping, upper side (1 + epsilon_high; unset: epsilon)")
    scale_rewards: str = setting(
        "group", "grpo: divide advantages by the reward std of the group, the batch, or none", SCALE_REWARDS
    )
    num_iterations: int = setting(1, "grpo: optimizer steps on each generation batch (mu)")
    mask_truncated_completions: bool = setting(False, "grpo: completions cut by max_completion_length carry no loss")
    log_completions_steps: int = setting(10, "grpo: print and record sampled completions every this many steps")
    num_completions_to_print: int = setting(2, "grpo: how many sampled completions each time")

    @property
    def quantization(self) -> str | None:
        return "nf4" if self.load_in_4bit else "int8" if self.load_in_8bit else "fp8" if self.load_in_fp8 else None

    def __post_init__(self) -> None:
        _choice("lr_scheduler_type", self.lr_scheduler_type, SCHEDULERS)
        _choice("optim", self.optim, OPTIMIZERS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("finetuning", self.finetuning, FINETUNING)
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("method", self.method, METHODS)
        _choice("truncation_mode", self.truncation_mode, TRUNCATION_MODES)
        self._check_method()
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.adapter and self.finetuning != "lora":
            raise ConfigError(f"adapter continues a LoRA adapter, but finetuning is {self.finetuning}; drop one")
        if self.fsdp_offload_params and self.strategy != "fsdp":
            raise ConfigError(
                f"fsdp_offload_params keeps FSDP's shards in host memory, but strategy is {self.strategy}; "
                "set strategy: fsdp (and several processes) or drop fsdp_offload_params"
            )
        for name in (
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "per_device_eval_batch_size",
            "max_bad_steps",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("save_steps", "save_total_limit", "eval_steps", "early_stopping_patience"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be 0 (off) or a positive number of steps, got {getattr(self, name)}")
        aligned = self.eval_steps and self.save_steps and self.save_steps % self.eval_steps == 0
        if self.load_best_model_at_end and not aligned:
            raise ConfigError(
                f"load_best_model_at_end needs an evaluation at every checkpoint: set eval_steps and make save_steps "
                f"a multiple of it (now eval_steps {self.eval_steps}, save_steps {self.save_steps}; e.g. eval_steps: "
                f"50, save_steps: 100)"
            )
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.gradient_checkpointing not in (True, False, "offload"):
            raise ConfigError(f"gradient_checkpointing: {self.gradient_checkpointing!r}; use true, false or offload")
        layers = self.gradient_checkpointing_layers
        if layers != "auto" and (isinstance(layers, str) or not 0 < layers <= 1):
            raise ConfigError(
                f"gradient_checkpointing_layers: {layers!r}; use a fraction in (0, 1] of the decoder layers to "
                "checkpoint (e.g. 0.5: every other layer), auto (the fewest that fit this GPU's memory), or "
                "gradient_checkpointing: false"
            )
        chosen = [k for k in ("load_in_4bit", "load_in_8bit", "load_in_fp8") if getattr(self, k)]
        if len(chosen) > 1:
            raise ConfigError(f"{' and '.join(chosen)} are set together; choose one base-weight format")
        if chosen and self.finetuning != "lora":
            raise ConfigError(f"{self.finetuning} fine-tuning needs 16-bit weights; drop {chosen[0]} or use LoRA")
        self._check_partial()
        self.report_to = _report_targets(self.report_to)
        if self.resume == "":
            self.resume = False
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise ConfigError("set max_steps or num_train_epochs to a positive value")

    def _check_method(self) -> None:
        """beta and loss_type default per method (TRL's DPOConfig / GRPOConfig defaults); GRPO's own keys."""
        grpo = self.method == "grpo"
        if self.beta is None:
            self.beta = 0.0 if grpo else 0.1
        if self.loss_type is None:
            self.loss_type = "dapo" if grpo else "sigmoid"
        _choice("loss_type", self.loss_type, GRPO_LOSS_TYPES if grpo else DPO_LOSS_TYPES)
        if grpo:
            if self.beta < 0:
                raise ConfigError(f"beta must be 0 (no reference) or positive, got {self.beta}")
            if self.num_generations < 2:
                raise ConfigError(
                    f"num_generations is {self.num_generations}; GRPO compares completions within a group of the "
                    "same prompt, so it needs at least 2 (8 is usual)"
                )
            rows = self.per_device_train_batch_size * self.gradient_accumulation_steps
            rows *= env.world_size()
            if rows % self.num_generations:
                raise ConfigError(
                    f"per_device_train_batch_size x gradient_accumulation_steps x processes = {rows} completions per "
                    f"step is not a whole number of groups of {self.num_generations} (num_generations); make it a "
                    f"multiple of {self.num_generations}"
                )
            _choice("scale_rewards", self.scale_rewards, SCALE_REWARDS)
            for name in ("max_completion_length", "num_iterations"):
                if getattr(self, name) < 1:
                    raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
            if self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
                raise ConfigError(f"epsilon / epsilon_high must be positive, got {self.epsilon} / {self.epsilon_high}")
            if not self.reward_funcs:
                raise ConfigError(
                    "method grpo needs reward_funcs: built-in names (think_format, answer_match, numeric_match, "
                    "length_penalty, iso_date) or module:function paths, e.g. reward_funcs: [mymodule:correct]"
                )
            if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
                raise ConfigError(
                    f"reward_weights has {len(self.reward_weights)} values for {len(self.reward_funcs)} reward_funcs; "
                    "give one weight per function"
                )
            if self.auto_batch_size:
                raise ConfigError("auto_batch_size does not apply to grpo yet; set per_device_train_batch_size")
        elif self.beta <= 0:
            raise ConfigError(f"beta must be positive, got {self.beta}")

    def _check_partial(self) -> None:
        if self.finetuning == "partial":
            if self.train_layers <= 0:
                raise ConfigError(
                    "finetuning: partial needs train_layers: the number of top decoder layers to train (e.g. 4) "
                    "or a fraction of them (e.g. 0.25)"
                )
            if self.train_layers >= 1 and not float(self.train_layers).is_integer():
                raise ConfigError(
                    f"train_layers: {self.train_layers} is neither a whole number of layers nor a fraction below 1"
                )
        elif self.train_layers:
            raise ConfigError(
                f"train_layers: {self.train_layers} applies to finetuning: partial, but finetuning is "
                f"{self.finetuning}; set finetuning: partial or drop train_layers"
            )


def _report_targets(values: list[str]) -> list[str]:
    """report_to as a list of integrations: "all" means both, "none" none."""
    out: list[str] = []
    for value in values:
        _choice("report_to", value, REPORT_TO)
        out += {"none": [], "all": ["tensorboard", "wandb"]}.get(value, [value])
    return list(dict.fromkeys(out))


def _choice(key: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{key}: {value!r} is not valid; choose one of: {', '.join(valid)}")


@dataclass
class RunConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        has_eval = self.data.eval_path is not None or self.data.eval_split > 0
        if self.train.eval_steps and not has_eval:
            raise ConfigError(
                f"eval_steps: {self.train.eval_steps} needs eval data; set eval_dataset (a file) or eval_split "
                "(a fraction of the training rows), or set eval_steps: 0"
            )
        if self.train.early_stopping_patience and not self.train.eval_steps:
            raise ConfigError(
                f"early_stopping_patience: {self.train.early_stopping_patience} watches the eval loss, which "
                "eval_steps computes; set eval_steps (e.g. 50) or drop early_stopping_patience"
            )

    def to_flat(self) -> dict[str, Any]:
        """The resolved config as the flat mapping a YAML file would hold."""
        out = {}
        for key, (section, name) in KEYS.items():
            if key in ALIASES:
                continue
            out[key] = getattr(getattr(self, section), name)
        return out


# The --help lines of the LoRA keys: LoRAConfig keeps PEFT's field names and carries no help of its own.
LORA_HELP = {
    "lora_r": "rank of the LoRA matrices",
    "lora_alpha": "LoRA updates are scaled by lora_alpha / lora_r (by lora_alpha / sqrt(lora_r) with use_rslora)",
    "lora_dropout": "dropout on the input of the LoRA path",
    "target_modules": "linear layers that get LoRA, by name (all-linear: the attention and MLP projections)",
    "use_rslora": "rank-stabilised scaling, lora_alpha / sqrt(lora_r)",
    "use_dora": "DoRA (PEFT's use_dora): a trained magnitude per output feature times the normalised LoRA-updated "
    "weight; one per-feature multiply over LoRA, adapters load in PEFT",
}

# flat key -> (section, field); the LoRA and data keys carry PEFT / common SFT names
KEYS: dict[str, tuple[str, str]] = {f.name: ("train", f.name) for f in dataclasses.fields(TrainConfig)}
KEYS.update(
    {
        "lora_r": ("lora", "r"),
        "lora_alpha": ("lora", "lora_alpha"),
        "lora_dropout": ("lora", "lora_dropout"),
        "target_modules": ("lora", "target_modules"),
        "use_rslora": ("lora", "use_rslora"),
        "use_dora": ("lora", "use_dora"),
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
        "dataset_split": ("data", "split"),
        "dataset_cache": ("data", "cache"),
        "dataset_cache_dir": ("data", "cache_dir"),
        "dataset_num_proc": ("data", "num_proc"),
    }
)
ALIASES = {
    "model": "model_name_or_path",
    "r": "lora_r",
    "lora_target_modules": "target_modules",
    "max_length": "max_seq_length",  # TRL's DPOConfig name
}
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
        (element,) = typing.get_args(kind) or (str,)
        if element is float:  # reward_weights: numbers, a bool is not one
            if any(isinstance(v, bool) for v in items):
                raise ValueError
            return [float(str(v).strip()) for v in items]
        return [str(v).strip() for v in items]
    if base is dict:
        if not isinstance(value, dict):
            raise ValueError
        return value
    return value


def run_config_from_dict(values: dict[str, Any], source: str = "config") -> RunConfig:
    """Build a RunConfig from a flat mapping; unknown keys and bad values raise ConfigError."""
    parts: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    if values.get("method") == "grpo" and "per_device_train_batch_size" not in values:
        # GRPO's micro-batch counts completions: by default one group (TRL's default batch 8 = num_generations 8)
        values = {**values, "per_device_train_batch_size": values.get("num_generations", 8)}
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
    if "dataset" not in out and out.get("method") == "grpo":  # the GRPO demo: the same task, rewarded
        out["dataset"] = str(PACKAGE_DATA / "iso_dates_prompts.jsonl")
        out.setdefault("eval_dataset", str(PACKAGE_DATA / "iso_dates_prompts_eval.jsonl"))
        out.setdefault("reward_funcs", ["iso_date"])
        out.setdefault("max_steps", 30)
        out.setdefault("gradient_checkpointing", False)
        out.setdefault("num_generations", 8)
        out.setdefault("per_device_train_batch_size", 8)  # one prompt's group of 8 per step
        out.setdefault("max_completion_length", 16)
        out.setdefault("learning_rate", 1e-3)
        out.setdefault("warmup_steps", 2)
        out.setdefault("max_seq_length", 256)
        out.setdefault("log_completions_steps", 10)
        return out
    if "dataset" not in out and out.get("method", "sft") != "sft":  # the preference demo: the same task as pairs
        out["dataset"] = str(PACKAGE_DATA / "iso_dates_pref.jsonl")
        out.setdefault("eval_dataset", str(PACKAGE_DATA / "iso_dates_pref_eval.jsonl"))
        out.setdefault("max_steps", 30)
        out.setdefault("gradient_checkpointing", False)
        out.setdefault("per_device_train_batch_size", 8)
        out.setdefault("learning_rate", 5e-4)
        out.setdefault("warmup_steps", 3)
        out.setdefault("max_seq_length", 256)
        return out
    if "dataset" not in out:
        out["dataset"] = str(PACKAGE_DATA / "iso_dates.jsonl")
        out.setdefault("eval_dataset", str(PACKAGE_DATA / "iso_dates_eval.jsonl"))
        out.setdefault("max_steps", 30)
        out.setdefault("gradient_checkpointing", False)  # CPU demo: memory is plentiful, recompute is not free
        out.setdefault("max_new_tokens", 16)
        out.setdefault("per_device_train_batch_size", 4)  # 30 x 4 rows: 88% exact match, 90 s on 2 cores
        out.setdefault("learning_rate", 1e-3)
        out.setdefault("warmup_steps", 5)
        out.setdefault("max_seq_length", 256)
    return out
