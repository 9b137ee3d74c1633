"""`velotune plan CONFIG [--gpu NAME|SIZE] [--key value ...]`: predicted peak GPU memory of a run, whether it fits,
and the fastest setting that does. CONFIG is a training YAML file, a model directory or a .gguf file; only the
model's config.json / GGUF metadata is read, never its weights. `--max_seq_length auto` answers instead: the longest
sequence that fits each GPU with the rest of the config."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from velotune.errors import ConfigError
from velotune.train.config import load_yaml, run_config_from_dict, with_defaults

ACCEPTS_OVERRIDES = True
MiB = 2**20
# Cards people name besides those of the planner's table (train.memory.GPUS), with the memory each reports.
MORE_GPUS = {
    "RTX3090": 24576 * MiB,
    "L4": 23034 * MiB,
    "A10G": 23028 * MiB,
    "V100-16GB": 16160 * MiB,
    "V100-32GB": 32510 * MiB,
}
# Names that leave the memory size out: the smaller card (what fits it fits the larger one)
GPU_ALIASES = {"A100": "A100-40GB", "V100": "V100-16GB", "H100-80GB": "H100", "H200-141GB": "H200"}


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="predict peak GPU memory of a training config and recommend a setting that fits",
        description="Predict the peak GPU memory of `velotune train CONFIG` from the model's shapes (no weights "
        "are loaded), say whether it fits the GPU, and recommend the fastest micro-batch, accumulation, "
        "checkpointing and 4-bit setting that does. Config keys can be overridden with --key value.",
    )
    p.usage = "velotune plan CONFIG [--gpu NAME|SIZE] [--max_seq_length auto] [--key value ...]"
    p.add_argument(
        "--gpu",
        default=None,
        help="the GPU to plan for, by name (RTX 4090, 3090, A100, a100-80gb: case, spaces and dashes do not matter) "
        "or memory size (24GB); default: this machine's, else all known",
    )


def _values(config: str | None, extra: list[str]) -> dict[str, Any]:
    from velotune.cli.train import parse_overrides

    values: dict[str, Any] = {}
    if config and (Path(config).is_dir() or config.endswith(".gguf")):
        values["model_name_or_path"] = config
    elif config:
        values = load_yaml(config)
    values.update(parse_overrides(extra))
    return with_defaults(values)


def _name_key(name: str) -> str:
    """A card name without case, spaces, dashes, vendor or RTX prefix, and with G for GB: "NVIDIA RTX 4090" and
    "4090" meet, as do "A100 80G" and "a100-80gb"."""
    key = re.sub(r"[\s_-]", "", name.lower())
    for prefix in ("nvidia", "geforce", "tesla", "rtx"):
        key = key.removeprefix(prefix)
    return re.sub(r"(\d)(?:gb|gib)$", r"\1g", key)


def resolve_gpu(text: str) -> tuple[str, int]:
    """(name, bytes) for a card name or a memory size; ConfigError listing the names otherwise."""
    from velotune.train.memory import GPUS, parse_gpu

    cards = GPUS | MORE_GPUS
    names = {_name_key(n): n for n in cards} | {_name_key(a): n for a, n in GPU_ALIASES.items()}
    key = _name_key(text)
    if key in names:
        return names[key], cards[names[key]]
    try:
        return parse_gpu(text)
    except ConfigError:
        known = ", ".join(sorted(cards, key=cards.get))
        raise ConfigError(
            f"--gpu {text!r}: not a card velotune knows; give its memory size (e.g. 24GB) or one of: {known}, A100, "
            f"V100 (case, spaces and dashes do not matter)"
        ) from None


def _gpus(choice: str | None) -> list[tuple[str, int]]:
    import torch

    from velotune.train.memory import GPUS

    if choice:
        return [resolve_gpu(choice)]
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return [(props.name, props.total_memory)]
    return list(GPUS.items())


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from velotune.train.memory import (
        GiB,
        count_parameters,
        estimate,
        read_model_config,
        recommend,
        setting_for,
        usable_bytes,
    )

    gpus = _gpus(args.gpu)  # a bad --gpu is reported before anything is read or printed
    config = extra.pop(0) if extra and not extra[0].startswith("--") else None
    values = _values(config, extra)
    auto_length = values.get("max_seq_length") == "auto"
    if auto_length:
        values["max_seq_length"] = 2048  # searched below
    cfg = run_config_from_dict(values, source=config or "command line")
    model, where = read_model_config(cfg.train.model_name_or_path)
    setting = setting_for(cfg, model)
    if auto_length:
        print(f"model {where}: {model.model_type}, {count_parameters(model) / 1e9:.2f} B parameters")
        for name, capacity in gpus:
            print(longest_line(model, setting, name, capacity))
        return 0

    effective = cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps
    est = estimate(model, setting)
    print(f"model {where}: {model.model_type}, {count_parameters(model) / 1e9:.2f} B parameters")
    print(
        f"{cfg.train.finetuning} fine-tuning, micro-batch {setting.micro_batch} x {setting.seq_len} tokens "
        f"(gradient_accumulation_steps {cfg.train.gradient_accumulation_steps}), {cfg.train.optim}"
    )
    print(est.table())
    for name, capacity in gpus:
        usable = usable_bytes(capacity)
        verdict = "fits" if est.total <= usable else "does NOT fit"
        best = recommend(model, setting, effective, capacity)
        head = f"{name} ({capacity / GiB:.0f} GiB, ~{usable / GiB:.1f} usable): this setting {verdict}"
        if best is None:
            print(f"{head}; nothing fits, even micro-batch 1, 4-bit, offloaded checkpoints: lower max_seq_length")
        elif best.setting == setting:
            print(f"{head}, and nothing faster does")
        elif len(gpus) > 1:
            print(f"{head}; fastest that fits: {best.overrides()}")
        else:
            print(f"{head}\n  fastest that fits: {best.describe()}\n  as options: {best.overrides()}")
    return 0


def longest_line(model: Any, setting: Any, name: str, capacity: int) -> str:
    """What `--max_seq_length auto` prints for one GPU: the longest length that fits and its predicted peak, the
    model's trained context when that is shorter, and what offloaded checkpoints (+ 4-bit LoRA) would reach."""
    from dataclasses import replace

    from velotune.train.memory import GiB, estimate, longest_seq_len

    n = longest_seq_len(model, setting, capacity)
    head = f"{name} ({capacity / GiB:.0f} GiB):"
    if n == 0:
        line = f"{head} not even 1024 tokens fit with micro-batch {setting.micro_batch}"
    else:
        peak = estimate(model, replace(setting, seq_len=n)).total
        line = f"{head} longest max_seq_length that fits: {n} tokens (predicted peak {peak / GiB:.1f} GiB)"
        if n > model.max_position_embeddings:
            line += f"; the model was trained to {model.max_position_embeddings}"
    lean = replace(setting, checkpointing="offload", checkpoint_layers=1.0)
    if setting.finetuning == "lora" and setting.quantization is None:
        lean = replace(lean, quantization="nf4")
    far = longest_seq_len(model, lean, capacity) if lean != setting else 0
    if far > n:
        extra = " --load_in_4bit true" if lean.quantization != setting.quantization else ""
        line += f"\n  with --gradient_checkpointing offload{extra}: {far} tokens"
    return line
