"""Checkpoints a run resumes from exactly: same batches in the same order, same loss curve.

A checkpoint is a directory `checkpoint-<step>` in the run directory holding

  trainable.safetensors   the parameters that train (LoRA A/B, or the layers of a full/partial fine-tune)
  optimizer.pt            optimizer state
  trainer_state.pt        scheduler state and the torch RNG states (CPU and every CUDA device)
  trainer_state.json      step, data position (epoch, step within epoch), micro-batch and accumulation in force,
                          counters, best eval loss, monitor state, python and numpy RNG states
  config.yaml             the resolved run config
  metrics.jsonl           the metrics written up to this step

FSDP runs that train whole layers (full / partial fine-tuning) write `sharded/` instead of the first two files:
torch.distributed.checkpoint's per-process files of the trainable weights and optimizer state, so no process ever
holds them whole; they load back on any number of processes (or one).

It is written into a hidden temporary directory, flushed to disk, then renamed: a run killed while writing leaves
the previous checkpoints intact, and a directory called checkpoint-<step> is always complete.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from velotune.errors import ConfigError

PREFIX = "checkpoint-"
WEIGHTS, OPTIMIZER, TORCH_STATE, STATE, CONFIG, METRICS = (
    "trainable.safetensors",
    "optimizer.pt",
    "trainer_state.pt",
    "trainer_state.json",
    "config.yaml",
    "metrics.jsonl",
)
SHARDED = "sharded"
REQUIRED = (WEIGHTS, OPTIMIZER, TORCH_STATE, STATE, CONFIG)
REQUIRED_SHARDED = (SHARDED, TORCH_STATE, STATE, CONFIG)


def missing_files(path: Path) -> list[str]:
    """The files a complete checkpoint has and `path` lacks (whole-state or sharded layout)."""
    required = REQUIRED_SHARDED if (path / SHARDED).is_dir() else REQUIRED
    return [name for name in required if not (path / name).exists()]


# Keys a resumed run may change: they do not alter which batches come next or what a step computes.
MAY_CHANGE_ON_RESUME = {
    "resume",
    "output_dir",
    "logging_steps",
    "save_steps",
    "save_total_limit",
    "eval_steps",
    "per_device_eval_batch_size",
    "early_stopping_patience",
    "max_bad_steps",
    "report_to",
    "compare_samples",
    "max_new_tokens",
    "save_merged",
    "device",
    "strategy",  # checkpoints hold whole states: they move between layouts
    "auto_batch_size",
    "max_steps",
    "num_train_epochs",
    "eval_dataset",
    "learning_rate",  # lowered to resume after a divergence; the schedule keeps its shape
    "max_grad_norm",
}


@dataclass
class TrainState:
    """Everything about a run's progress besides tensors; saved as trainer_state.json."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # of the next step
    step_in_epoch: int = 0  # of the next step
    micro_batch_size: int = 0  # in force (out-of-memory recovery may have lowered it)
    accumulation: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    bad_in_a_row: int = 0  # consecutive non-finite steps
    skipped: list[dict] = field(default_factory=list)  # {"step", "reason", "rows"} of every skipped step
    oom_events: list[dict] = field(default_factory=list)
    eval_loss: float | None = None  # measured at this step, if an evaluation ran at it
    best_eval_loss: float | None = None  # of the best checkpoint
    best_checkpoint: str | None = None
    stopped_early: bool = False
    monitor: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)  # what identifies the data order: examples, per step, seed
    rng: dict = field(default_factory=dict)  # python and numpy generator states
    objective: dict = field(default_factory=dict)  # the objective's own state (GRPO: a reused generation batch)

    @classmethod
    def from_dict(cls, values: dict) -> TrainState:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in values.items() if k in known})


def step_of(path: Path) -> int | None:
    """The step of a complete checkpoint directory's name, or None for anything else."""
    m = re.fullmatch(rf"{PREFIX}(\d+)", path.name)
    return int(m.group(1)) if m and path.is_dir() else None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints in `run_dir`, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(step_of(p), p) for p in run_dir.iterdir()]
    return [p for s, p in sorted((s, p) for s, p in found if s is not None) if (p / STATE).exists()]


def find_checkpoint(resume: bool | str, output_dir: str | None) -> Path:
    """The checkpoint `resume` names: true -> the latest in output_dir; a path -> that checkpoint (or the latest in
    that run directory). ConfigError when there is none, naming what was looked at."""
    if resume is True:
        if not output_dir:
            raise ConfigError(
                "resume: true continues the run in output_dir, but output_dir is not set; give --output_dir RUN_DIR "
                "or --resume RUN_DIR/checkpoint-N"
            )
        found = list_checkpoints(Path(output_dir))
        if not found:
            what = "does not exist" if not Path(output_dir).exists() else "holds no checkpoint (checkpoint-N)"
            raise ConfigError(
                f"--resume: nothing to resume: {output_dir} {what}; start the run without --resume, or give "
                "--resume PATH of a checkpoint directory"
            )
        return found[-1]
    path = Path(str(resume))
    if step_of(path) is None and list_checkpoints(path):
        return list_checkpoints(path)[-1]
    missing = missing_files(path)
    if path.is_dir() and not missing:
        return path
    near = list_checkpoints(path.parent) if path.parent.exists() else []
    listing = f"; complete checkpoints there: {', '.join(p.name for p in near)}" if near else ""
    why = "does not exist" if not path.exists() else f"is not a complete checkpoint (missing {', '.join(missing)})"
    raise ConfigError(f"--resume {path}: {why}{listing}")


def saved_config(checkpoint: Path) -> dict[str, Any]:
    return yaml.safe_load((checkpoint / CONFIG).read_text()) or {}


def config_differences(
    saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any] | None = None
) -> list[str]:
    """`key: saved -> current` for each setting that differs and that a resumed run must keep. A key the saved
    config lacks (added by a later velotune) had its default then: `defaults` gives it."""
    saved = (defaults or {}) | saved
    keys = sorted((set(saved) | set(current)) - MAY_CHANGE_ON_RESUME)
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def capture_rng() -> tuple[dict, dict[str, Any]]:
    """(python and numpy states as JSON-able values, torch CPU and CUDA states as tensors)."""
    version, words, gauss = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state()
    plain = {"python": [version, list(words), gauss], "numpy": [name, key.tolist(), pos, has_gauss, cached]}
    tensors: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["cuda"] = torch.cuda.get_rng_state_all()
    return plain, tensors


def restore_rng(plain: dict, tensors: dict[str, Any]) -> None:
    version, words, gauss = plain["python"]
    random.setstate((version, tuple(words), gauss))
    name, key, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(tensors["cuda"])


def _fsync_tree(directory: Path) -> None:
    for p in [*directory.iterdir(), directory]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def staging_dir(run_dir: Path, step: int) -> Path:
    """Where the processes of a sharded save write before rank 0 completes and renames the checkpoint."""
    return run_dir / f".{PREFIX}{step}.tmp-sharded"


def save_checkpoint(
    run_dir: Path,
    model: nn.Module | dict[str, torch.Tensor] | None,
    optimizer: torch.optim.Optimizer | dict[str, Any] | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    state: TrainState,
    config: dict[str, Any],
    pause: Callable[[int], None] | None = None,
    staged: Path | None = None,
) -> Path:
    """Write checkpoint-<state.step> atomically (temporary directory, then rename); returns its path. `model` and
    `optimizer` may be given as their whole states (distributed.full_trainable_state / full_optimizer_state), or
    as None with `staged`: a temporary directory already holding the sharded states."""
    final = run_dir / f"{PREFIX}{state.step}"
    tmp = staged or run_dir / f".{final.name}.tmp-{os.getpid()}"
    if staged is None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if model is not None:
        save_file(trainable_state(model) if isinstance(model, nn.Module) else model, str(tmp / WEIGHTS))
    if pause is not None:
        pause(state.step)  # test hook: a kill here must leave the earlier checkpoints usable
    if optimizer is not None:
        torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), tmp / OPTIMIZER)
    state.rng, tensors = capture_rng()
    torch.save({"scheduler": scheduler.state_dict(), **tensors}, tmp / TORCH_STATE)
    (tmp / CONFIG).write_text(yaml.safe_dump(config, sort_keys=False))
    if (run_dir / METRICS).exists():
        shutil.copyfile(run_dir / METRICS, tmp / METRICS)
    (tmp / STATE).write_text(json.dumps(asdict(state), indent=1))
    _fsync_tree(tmp)
    if final.exists():  # the same step saved again (a signal right after a save): replace it whole
        old = run_dir / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync_tree(run_dir)
    return final


def remove_partial(run_dir: Path) -> None:
    """Delete what killed runs left behind: temporary checkpoint directories that were never renamed."""
    if run_dir.is_dir():
        for p in run_dir.glob(f".{PREFIX}*"):
            shutil.rmtree(p, ignore_errors=True)


def rotate(run_dir: Path, keep_last: int, best: str | None) -> list[Path]:
    """Delete all but the last `keep_last` checkpoints and the best one (keep_last 0: keep all); returns deleted."""
    found = list_checkpoints(run_dir)
    if keep_last <= 0 or len(found) <= keep_last:
        return []
    doomed = [p for p in found[:-keep_last] if best is None or p.name != Path(best).name]
    for p in doomed:
        shutil.rmtree(p)
    return doomed


@dataclass
class Checkpoint:
    """A checkpoint read back: its state and tensors, ready to be put into a Trainer."""

    path: Path
    state: TrainState
    weights: dict[str, torch.Tensor] | None  # None: sharded (load with distributed.load_sharded_state)
    optimizer: dict[str, Any] | None
    torch_state: dict[str, Any]


def load_checkpoint(path: Path, with_optimizer: bool = True) -> Checkpoint:
    """A complete checkpoint read back (whole-state layout: weights and, if asked, optimizer state in memory)."""
    missing = missing_files(path)
    if missing:
        raise ConfigError(f"{path}: not a complete checkpoint (missing {', '.join(missing)})")
    state = TrainState.from_dict(json.loads((path / STATE).read_text()))
    sharded = (path / SHARDED).is_dir()
    weights = None if sharded else load_file(str(path / WEIGHTS))
    read_optimizer = with_optimizer and not sharded
    optimizer = torch.load(path / OPTIMIZER, map_location="cpu", weights_only=True) if read_optimizer else None
    torch_state = torch.load(path / TORCH_STATE, map_location="cpu", weights_only=True)
    return Checkpoint(path, state, weights, optimizer, torch_state)
