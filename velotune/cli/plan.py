"""`velotune plan CONFIG [--gpu NAME|SIZE] [--key value ...]`: predicted peak GPU memory of a run, whether it fits,
and the fastest setting that does. CONFIG is a training YAML file, a model directory or a .gguf file; only the
model's config.json / GGUF metadata is read, never its weights."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from velotune.train.config import load_yaml, run_config_from_dict, with_defaults

ACCEPTS_OVERRIDES = True


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "plan",
        help="predict peak GPU memory of a training config and recommend a setting that fits",
        description="Predict the peak GPU memory of `velotune train CONFIG` from the model's shapes (no weights "
        "are loaded), say whether it fits the GPU, and recommend the fastest micro-batch, accumulation, "
        "checkpointing and 4-bit setting that does. Config keys can be overridden with --key value.",
    )
    p.usage = "velotune plan CONFIG [--gpu 24GB|T4|RTX4090|A100-40GB|A100-80GB|H100|H200] [--key value ...]"
    p.add_argument("--gpu", default=None, help="the GPU to plan for (default: this machine's, else all known)")


def _values(config: str | None, extra: list[str]) -> dict[str, Any]:
    from velotune.cli.train import parse_overrides

    values: dict[str, Any] = {}
    if config and (Path(config).is_dir() or config.endswith(".gguf")):
        values["model_name_or_path"] = config
    elif config:
        values = load_yaml(config)
    values.update(parse_overrides(extra))
    return with_defaults(values)


def _gpus(choice: str | None) -> list[tuple[str, int]]:
    import torch

    from velotune.train.memory import GPUS, parse_gpu

    if choice:
        return [parse_gpu(choice)]
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

    config = extra.pop(0) if extra and not extra[0].startswith("--") else None
    cfg = run_config_from_dict(_values(config, extra), source=config or "command line")
    model, where = read_model_config(cfg.train.model_name_or_path)
    setting = setting_for(cfg, model)
    effective = cfg.train.per_device_train_batch_size * cfg.train.gradient_accumulation_steps
    est = estimate(model, setting)
    print(f"model {where}: {model.model_type}, {count_parameters(model) / 1e9:.2f} B parameters")
    print(
        f"{cfg.train.finetuning} fine-tuning, micro-batch {setting.micro_batch} x {setting.seq_len} tokens "
        f"(gradient_accumulation_steps {cfg.train.gradient_accumulation_steps}), {cfg.train.optim}"
    )
    print(est.table())
    gpus = _gpus(args.gpu)
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
