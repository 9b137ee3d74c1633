"""The runs under a directory and what each wrote, read for the page: list rows, a run's details, checkpoints."""

from __future__ import annotations

import json
import os
import shlex
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

import yaml

from velotune.dashboard.metrics import MetricsFile, finite, is_train_row, numbers
from velotune.dashboard.paths import NotFound, inside
from velotune.dashboard.status import run_status
from velotune.train.checkpoint import METRICS, PREFIX, list_checkpoints
from velotune.train.run import DATA_REPORT
from velotune.train.status import STATUS

MARKERS = ("config.yaml", STATUS, METRICS)  # a directory holding one of these is a run
MAX_DEPTH = 4  # how deep below the runs directory runs are looked for
SKIP_DIRS = ("adapter", "merged", "gguf", "tensorboard", "wandb")


def read_config(run_dir: Path) -> tuple[dict[str, Any], str | None]:
    """(the resolved config, None), or ({}, what is wrong with config.yaml)."""
    path = run_dir / "config.yaml"
    try:
        values = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        return {}, "no config.yaml (the run has not written it yet)"
    except (OSError, UnicodeDecodeError) as exc:
        return {}, f"config.yaml cannot be read ({exc})"
    except yaml.YAMLError as exc:
        return {}, f"config.yaml is not valid YAML ({' '.join(str(exc).split())})"
    if not isinstance(values, dict):
        return {}, f"config.yaml holds a {type(values).__name__}, not a mapping of settings"
    return values, None


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return values if isinstance(values, dict) else None


class RunsDir:
    """The runs directory: finds runs, reads them, and keeps each metrics.jsonl's rows read so far."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self._metrics: dict[Path, MetricsFile] = {}
        self._lock = threading.Lock()

    # ---- finding runs -----------------------------------------------------------------------------------------

    def find(self) -> list[Path]:
        """Run directories under the root (the root itself if it is one), newest first."""
        found: list[Path] = []
        self._walk(self.root, 0, found)
        return sorted(found, key=lambda p: (run_status(p).started or 0.0, str(p)), reverse=True)

    def _walk(self, directory: Path, depth: int, found: list[Path]) -> None:
        if any((directory / m).is_file() for m in MARKERS):
            found.append(directory)
            return  # a run's own subdirectories (checkpoints, adapter/) are not runs
        if depth >= MAX_DEPTH:
            return
        try:
            children = sorted(p for p in directory.iterdir() if p.is_dir() and not p.is_symlink())
        except OSError:
            return
        for child in children:
            if not child.name.startswith((".", PREFIX)) and child.name not in SKIP_DIRS:
                self._walk(child, depth + 1, found)

    def name(self, run_dir: Path) -> str:
        return run_dir.relative_to(self.root).as_posix()

    def run(self, name: str) -> Path:
        """The run directory a request names (its path relative to the root)."""
        path = inside(self.root, name)
        if not path.is_dir() or not any((path / m).is_file() for m in MARKERS):
            raise NotFound(f"no run {name!r} in {self.root}")
        return path

    def metrics(self, run_dir: Path) -> MetricsFile:
        with self._lock:
            file = self._metrics.setdefault(run_dir, MetricsFile(run_dir / METRICS))
        return file.refresh()

    # ---- what the page shows ----------------------------------------------------------------------------------

    def row(self, run_dir: Path) -> dict[str, Any]:
        """One line of the runs list (a run that cannot be read says why instead)."""
        try:
            return self._row(run_dir)
        except OSError as exc:
            return {"name": self.name(run_dir), "status": "failed", "note": f"cannot be read: {exc}", "step": 0}

    def _row(self, run_dir: Path) -> dict[str, Any]:
        config, config_error = read_config(run_dir)
        status = run_status(run_dir)
        summary = read_json(run_dir / "summary.json") or {}
        metrics = self.metrics(run_dir)
        train = [r for r in metrics.rows if is_train_row(r)]
        evals = numbers(metrics.rows, "eval_loss")
        memory = numbers(metrics.rows, "gpu_memory_gib")
        max_steps = config.get("max_steps")
        return finite(
            {
                "name": self.name(run_dir),
                **asdict(status),
                "model": config.get("model_name_or_path"),
                "method": config.get("method", "sft") if config else None,
                "step": max((r["step"] for r in train), default=summary.get("steps", 0)),
                "max_steps": max_steps if isinstance(max_steps, int) and max_steps > 0 else None,
                "best_eval_loss": min(evals) if evals else summary.get("eval_loss"),
                "tokens_per_second": summary.get("tokens_per_second") or _tokens_per_second(train),
                "peak_gpu_memory_gib": summary.get("peak_gpu_memory_gib") or (max(memory) if memory else None),
                "config_error": config_error,
                "bad_lines": metrics.bad_lines,
            }
        )

    def details(self, run_dir: Path) -> dict[str, Any]:
        """Everything the run page shows besides the curves."""
        config, _ = read_config(run_dir)
        summary = read_json(run_dir / "summary.json")
        try:
            config_text = (run_dir / "config.yaml").read_text(errors="replace")
        except OSError:
            config_text = None
        try:
            data_report = (run_dir / DATA_REPORT).read_text(errors="replace")
        except OSError:
            data_report = None
        out = self.row(run_dir) | {
            "path": str(run_dir),
            "config": finite(config),
            "config_text": config_text,
            "summary": finite(summary),
            "data_report": data_report,
            "dataset": config.get("dataset"),
            "before_after": _before_after(summary or {}),
            "checkpoints": self.checkpoints(run_dir),
            "curves_png": (run_dir / "training_curves.png").is_file(),
        }
        out["commands"] = _commands(run_dir, out["status"], out["checkpoints"], config.get("dataset"))
        return out

    def checkpoints(self, run_dir: Path) -> list[dict[str, Any]]:
        out = []
        paths = list_checkpoints(run_dir)
        states = [read_json(path / "trainer_state.json") or {} for path in paths]
        best = states[-1].get("best_checkpoint") if states else None  # the newest knows the best of all
        for path, state in zip(paths, states, strict=True):
            out.append(
                finite(
                    {
                        "name": path.name,
                        "step": state.get("step"),
                        "eval_loss": state.get("eval_loss"),
                        "best": best == path.name,
                        "mib": round(_size(path) / 2**20, 1),
                    }
                )
            )
        return out


def _tokens_per_second(train: list[dict[str, Any]]) -> float | None:
    last = train[-1] if train else {}
    tokens, seconds = last.get("tokens"), last.get("elapsed_s")
    if isinstance(tokens, int | float) and isinstance(seconds, int | float) and seconds > 0:
        return round(tokens / seconds, 1)
    return None


def _size(path: Path) -> int:
    total = 0
    for base, _, files in os.walk(path):
        for name in files:
            try:
                total += (Path(base) / name).stat().st_size
            except OSError:
                pass
    return total


def _before_after(summary: dict[str, Any]) -> dict[str, Any] | None:
    """Held-out answers of the base and the tuned model, one row per prompt (SFT), or the before / after eval
    metrics (preference and GRPO runs)."""
    before, after = summary.get("before"), summary.get("after")
    if isinstance(before, dict) and isinstance(after, dict):
        held = summary.get("held_out") or []
        rows = []
        for i, (b, a) in enumerate(zip(before.get("answers", []), after.get("answers", []), strict=False)):
            sample = held[i] if i < len(held) and isinstance(held[i], dict) else {}
            rows.append({"prompt": sample.get("prompt"), "reference": sample.get("reference"), "before": b, "after": a})
        score = {k: f"{v.get('correct')}/{v.get('total')}" for k, v in (("before", before), ("after", after))}
        return {"rows": rows, "score": score}
    pb, pa = summary.get("preference_before"), summary.get("preference_after")
    if isinstance(pb, dict) and isinstance(pa, dict):
        return {"metrics": [{"name": k, "before": pb[k], "after": pa.get(k)} for k in pb]}
    return None


def _commands(run_dir: Path, status: str, checkpoints: list[dict], dataset: Any) -> dict[str, str]:
    """Commands shown ready to copy: export (finished runs), generate, and data inspect of the training data."""
    run = shlex.quote(str(run_dir))
    out: dict[str, str] = {}
    if status == "finished":
        out["generate"] = f'velotune generate {run} --prompt "..."'
        out["export GGUF"] = f"velotune export {run} --quant q4_k_m"
        out["export merged"] = f"velotune export {run} --format hf"
    if isinstance(dataset, str) and dataset:
        out["data inspect"] = f"velotune data inspect {shlex.quote(dataset)}"
    return out
