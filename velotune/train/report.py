"""Where metrics go: metrics.jsonl always, TensorBoard and Weights & Biases when asked for and installed, and a PNG
of the curves at the end (when matplotlib is installed).

Rows of metrics.jsonl: training steps {"step", "loss", "lr", "grad_norm", "tokens", "elapsed_s"}, evaluations
{"step", "eval_loss", "eval_ppl"}, skipped steps {"step", "skipped", "rows"}, monitor notices
{"step", "warning", "message"} and events such as {"step", "event": "out_of_memory", ...}.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

SCALARS = ("loss", "lr", "grad_norm", "eval_loss", "eval_ppl")


class MetricsLog:
    """Appends rows to metrics.jsonl (flushed at once) and forwards their numbers to the integrations."""

    def __init__(self, path: Path | None, integrations: list[Any] | None = None) -> None:
        self.path = path
        self.file = open(path, "a") if path else None  # noqa: SIM115  (closed by close())
        self.integrations = integrations or []

    def write(self, row: dict) -> None:
        if self.file:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        numbers = {k: row[k] for k in SCALARS if isinstance(row.get(k), int | float) and math.isfinite(row[k])}
        if numbers:
            for sink in self.integrations:
                sink.log(row["step"], numbers)

    def close(self) -> None:
        if self.file:
            self.file.close()
            self.file = None
        for sink in self.integrations:
            sink.close()


class TensorBoardSink:
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def log(self, step: int, numbers: dict[str, float]) -> None:
        for key, value in numbers.items():
            self.writer.add_scalar(f"train/{key}" if not key.startswith("eval") else f"eval/{key}", value, step)

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, run_dir: Path, config: dict[str, Any]) -> None:
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project="velotune", name=run_dir.name, dir=str(run_dir), config=config, resume="allow")

    def log(self, step: int, numbers: dict[str, float]) -> None:
        self.run.log(numbers, step=step)

    def close(self) -> None:
        self.run.finish()


def _wandb_logged_in() -> bool:
    import wandb

    api = getattr(wandb, "api", None)
    return bool(getattr(api, "api_key", None))


def open_integrations(
    report_to: list[str], run_dir: Path, config: dict[str, Any], log: Callable[[str], Any]
) -> list[Any]:
    """The integrations of `report_to` that can run here; a note for each that cannot (the run goes on)."""
    out: list[Any] = []
    if "tensorboard" in report_to:
        if importlib.util.find_spec("tensorboard") is None:
            log("report_to tensorboard: the tensorboard package is not installed (pip install tensorboard); skipped")
        else:
            out.append(TensorBoardSink(run_dir / "tensorboard"))
            log(f"TensorBoard logs in {run_dir / 'tensorboard'} (tensorboard --logdir {run_dir})")
    if "wandb" in report_to:
        if importlib.util.find_spec("wandb") is None:
            log("report_to wandb: the wandb package is not installed (pip install wandb); skipped")
        elif not _wandb_logged_in():
            log("report_to wandb: wandb is not logged in (run `wandb login` or set WANDB_API_KEY); skipped")
        else:
            out.append(WandbSink(run_dir, config))
    return out


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(metrics: Path, out: Path) -> str:
    """Draw loss (and eval loss), learning rate and gradient norm per step into `out`; returns a note for the user."""
    if importlib.util.find_spec("matplotlib") is None:
        return "no training curves PNG: matplotlib is not installed (pip install matplotlib)"
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(metrics)
    train = [r for r in rows if "loss" in r and "skipped" not in r]
    evals = [r for r in rows if "eval_loss" in r]
    if not train:
        return "no training curves PNG: metrics.jsonl has no training steps"
    fig = Figure(figsize=(10, 7), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    panels = (("loss", "loss"), ("eval loss", "eval_loss"), ("learning rate", "lr"), ("gradient norm", "grad_norm"))
    for ax, (title, key) in zip(axes, panels, strict=True):
        source = evals if key == "eval_loss" else train
        points = [(r["step"], r[key]) for r in source if isinstance(r.get(key), int | float)]
        if key == "eval_loss" and points:
            ax.plot(*zip(*points, strict=True), marker="o")
        elif points:
            ax.plot(*zip(*points, strict=True))
        else:
            ax.text(0.5, 0.5, "no evaluations" if key == "eval_loss" else "no data", ha="center", va="center")
        ax.set_title(title)
        ax.set_xlabel("step")
    fig.savefig(out, dpi=100)
    return f"training curves in {out}"
