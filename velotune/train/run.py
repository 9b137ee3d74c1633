"""A whole fine-tuning run: load, attach LoRA, tokenize, score before, train, score after, save."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from velotune.data import build_datasets
from velotune.errors import ConfigError, DataError
from velotune.lora.apply import get_peft_model, merge_lora
from velotune.lora.peft_format import save_adapter
from velotune.models.decoder import num_parameters
from velotune.quant.loading import load_quantized
from velotune.train.compare import Score, held_out_samples, score
from velotune.train.config import RunConfig
from velotune.train.loop import Trainer, TrainResult, evaluate_loss

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here; use device: cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def run_dir_for(cfg: RunConfig) -> Path:
    if cfg.train.output_dir:
        return Path(cfg.train.output_dir)
    stem = Path(cfg.train.model_name_or_path or "smollm2").name.removesuffix(".gguf") or "model"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_paths(cfg: RunConfig) -> None:
    """Fail on a missing dataset file before spending time loading the model."""
    for key, value in (("dataset", cfg.data.path), ("eval_dataset", cfg.data.eval_path)):
        if value is not None and "://" not in value and not Path(value).exists():
            raise DataError(f"{key} {value!r} does not exist; give the path of a .jsonl, .json, .csv or .parquet file")


@dataclass
class RunResult:
    run_dir: Path
    train: TrainResult
    before: Score | None
    after: Score | None
    eval_loss: float | None


def run(cfg: RunConfig, progress: bool = True, log: Callable[[str], Any] = print) -> RunResult:
    """Fine-tune as `cfg` says and write the run directory; returns what happened."""
    check_paths(cfg)
    device = resolve_device(cfg.train.device)
    dtype = resolve_dtype(cfg.train.dtype, device)
    torch.manual_seed(cfg.train.seed)
    model, tok = load_quantized(cfg.train.model_name_or_path, cfg.train.quantization, dtype, device)
    run_dir = run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    resolved = cfg.to_flat() | {"model_name_or_path": getattr(model, "source", cfg.train.model_name_or_path)}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))

    train_ds, eval_ds = build_datasets(cfg.data, tok)
    log(train_ds.report())
    if cfg.train.finetuning == "lora":
        get_peft_model(model, cfg.lora)
    model.gradient_checkpointing = cfg.train.gradient_checkpointing
    trainable, total = num_parameters(model, trainable_only=True), num_parameters(model)
    quant = f", {model.quantization} base" if model.quantization else ""
    name = resolved["model_name_or_path"]
    log(f"model {name} on {device} ({dtype}{quant}): {trainable:,} of {total:,} parameters train")

    samples = held_out_samples(cfg.data, cfg.train.compare_samples)
    before = score(model, tok, samples, cfg.data, cfg.train.max_new_tokens) if samples else None
    pad_id = tok.pad_token_id
    trainer = Trainer(model, train_ds, cfg.train, pad_id, run_dir, cfg.data.packing, cfg.data.max_seq_length, progress)
    result = trainer.train()
    eval_loss = evaluate_loss(model, eval_ds, pad_id) if eval_ds is not None and len(eval_ds) else None
    after = score(model, tok, samples, cfg.data, cfg.train.max_new_tokens) if samples else None

    if cfg.train.finetuning == "lora":
        save_adapter(model, run_dir / "adapter", base_model=resolved["model_name_or_path"])
        tok.save_pretrained(str(run_dir / "adapter"))
    if cfg.train.save_merged or cfg.train.finetuning == "full":
        from velotune.export.hf import save_hf

        merged = merge_lora(model) if cfg.train.finetuning == "lora" else model
        save_hf(merged, tok, run_dir / "merged", dtype=torch.bfloat16 if dtype != torch.float32 else torch.float32)
    summary = {
        "steps": result.steps,
        "first_loss": result.losses[0] if result.losses else None,
        "last_loss": result.losses[-1] if result.losses else None,
        "eval_loss": eval_loss,
        "tokens_per_second": round(result.tokens_per_second, 1),
        "seconds": round(result.seconds, 1),
    }
    if before and after:
        summary["before"] = {"correct": before.correct, "total": before.total, "answers": before.answers}
        summary["after"] = {"correct": after.correct, "total": after.total, "answers": after.answers}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return RunResult(run_dir, result, before, after, eval_loss)
