"""Where metrics go: metrics.jsonl always, TensorBoard and Weights & Biases when asked for and installed, and a PNG
of the curves at the end.

Rows of metrics.jsonl: training steps {"step", "loss", "lr", "grad_norm", "tokens", "elapsed_s"} (and on CUDA
"gpu_memory_gib", the peak so far), evaluations
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


# (panel title, key, rows it reads, whether long runs get a running mean): "train" rows are training steps, "eval"
# rows evaluations; the learning rate is a schedule, not a noisy measurement, so it is drawn as it is
PANELS = (
    ("loss", "loss", "train", True),
    ("eval loss", "eval_loss", "eval", False),
    ("learning rate", "lr", "train", False),
    ("gradient norm", "grad_norm", "train", True),
)
MARKERS_UP_TO = 50  # points per curve; beyond, a marker per point would hide the line
SMOOTH_FROM = 100  # points per curve from which a running mean is drawn over the (faded) raw values


def _points(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pairs = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float) and math.isfinite(r[key])]
    pairs.sort(key=lambda pair: pair[0])  # stable: rows of one step keep their order
    return [s for s, _ in pairs], [v for _, v in pairs]


def _running_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def curves_figure(rows: list[dict]) -> Any:
    """A matplotlib Figure of 2 x 2 panels (`PANELS`) from metrics.jsonl rows; None without training steps.

    Readable from 1 step to thousands: every value gets a marker while a curve has at most `MARKERS_UP_TO`
    points (one step is one dot, not an invisible zero-length line); from `SMOOTH_FROM` points the raw loss and
    gradient norm are faded behind a running mean of ~1/50 of the run. The x axes are shared and span the training
    steps, so a single final evaluation sits at its step. Each title carries the last value."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    train = [r for r in rows if "loss" in r and "skipped" not in r]
    evals = [r for r in rows if "eval_loss" in r]
    if not train:
        return None
    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True).ravel()
    first, last = train[0]["step"], max(r["step"] for r in train + evals)
    pad = max(0.5, 0.02 * (last - first))
    for ax, (title, key, source, smooth) in zip(axes, PANELS, strict=True):
        steps, values = _points(evals if source == "eval" else train, key)
        if not steps:
            ax.text(0.5, 0.5, "no evaluations" if source == "eval" else "no data", ha="center", va="center")
            ax.set_yticks([])
        elif len(steps) <= MARKERS_UP_TO:
            ax.plot(steps, values, marker="o", markersize=5 if len(steps) < 10 else 3)
        elif len(steps) < SMOOTH_FROM or not smooth:
            ax.plot(steps, values)
        else:
            window = max(2, len(steps) // 50)
            ax.plot(steps, values, alpha=0.3, linewidth=0.8, label="per step")
            ax.plot(steps, _running_mean(values, window), linewidth=1.6, label=f"mean of {window}")
            ax.legend(loc="best", fontsize="small")
        ax.set_title(f"{title} (last {values[-1]:.4g})" if steps else title)
        ax.set_xlim(first - pad, last + pad)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1, steps=[1, 2, 2.5, 5, 10]))
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4), useOffset=False)
        ax.grid(alpha=0.3)
    for ax in axes[2:]:
        ax.set_xlabel("step")
    return fig


def plot_metrics(metrics: Path, out: Path) -> str:
    """Draw `curves_figure` of the rows of `metrics` into the PNG `out`; returns a note for the user."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = curves_figure(read_metrics(metrics))
    if fig is None:
        return "no training curves PNG: metrics.jsonl has no training steps"
    FigureCanvasAgg(fig)
    fig.savefig(out, dpi=100)
    return f"training curves in {out}"
