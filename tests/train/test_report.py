"""The training curves PNG (train/report.py): every panel has data for a 1-step run with its final evaluation and for
a 1,000-step run, and the picture is a real PNG of the figure's size."""

from __future__ import annotations

import json
import math
from pathlib import Path

from matplotlib.image import imread

from velotune.train.report import MARKERS_UP_TO, PANELS, curves_figure, plot_metrics


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _train_row(step: int, n: int) -> dict:
    loss = 2.5 * math.exp(-step / max(n / 4, 1)) + 0.3 + 0.2 * math.sin(step * 1.7)  # decaying, noisy
    lr = 2e-4 * min(1.0, step / 30) * (1 - step / (n + 1))
    return {"step": step, "loss": loss, "lr": lr, "grad_norm": 1.0 + 0.5 * math.cos(step), "tokens": 512 * step}


def _curves(ax) -> list[tuple[list, list, str]]:
    return [(list(line.get_xdata()), list(line.get_ydata()), line.get_marker()) for line in ax.get_lines()]


def _check_png(path: Path) -> None:
    image = imread(path)
    assert image.shape[:2] == (700, 1000)  # 10 x 7 inches at 100 dpi
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_one_step_run_draws_a_marker_in_every_panel(tmp_path):
    """The quick start's shortest run: 1 step and the final eval loss that the run prints."""
    rows = [_train_row(1, 1), {"step": 1, "eval_loss": 1.7, "eval_ppl": math.exp(1.7)}]
    metrics = _write(tmp_path / "metrics.jsonl", rows)
    out = tmp_path / "training_curves.png"
    assert plot_metrics(metrics, out) == f"training curves in {out}"
    _check_png(out)

    fig = curves_figure(rows)
    for ax, (title, key, *_) in zip(fig.axes, PANELS, strict=True):
        (xs, ys, marker), *rest = _curves(ax)
        assert not rest and xs == [1] and marker == "o", title  # a dot, not a zero-length line
        assert ys == [rows[1 if key == "eval_loss" else 0][key]]
        assert ax.get_xlim()[0] < 1 < ax.get_xlim()[1]
        assert all(t == int(t) for t in ax.get_xticks()), "steps are whole numbers"
        assert "no evaluations" not in [t.get_text() for t in ax.texts]


def test_thousand_step_run_draws_every_step_and_a_running_mean(tmp_path):
    n = 1000
    rows = [_train_row(s, n) for s in range(1, n + 1)]
    rows += [
        {"step": s, "eval_loss": 2.0 - s / 1000, "eval_ppl": math.exp(2.0 - s / 1000)} for s in range(100, 1001, 100)
    ]
    rows.insert(500, {"step": 500, "skipped": "non-finite loss", "rows": ["data.jsonl:3"]})
    metrics = _write(tmp_path / "metrics.jsonl", rows)
    out = tmp_path / "training_curves.png"
    plot_metrics(metrics, out)
    _check_png(out)

    fig = curves_figure(rows)
    by_title = {title: ax for ax, (title, *_) in zip(fig.axes, PANELS, strict=True)}
    for title in ("loss", "gradient norm"):
        (raw_x, raw_y, raw_marker), (mean_x, mean_y, _) = _curves(by_title[title])
        assert raw_x == list(range(1, n + 1)) and mean_x == raw_x and raw_marker in ("None", "", None), title
        assert max(mean_y) - min(mean_y) < max(raw_y) - min(raw_y)  # smoother than the raw values
    ((lr_x, lr_y, _),) = _curves(by_title["learning rate"])  # a schedule: drawn as it is
    assert lr_x == list(range(1, n + 1)) and lr_y == [r["lr"] for r in rows if "lr" in r]
    ((eval_x, _, eval_marker),) = _curves(by_title["eval loss"])
    assert eval_x == list(range(100, 1001, 100)) and eval_marker == "o"
    assert by_title["eval loss"].get_xlim() == by_title["loss"].get_xlim()  # evals sit at their steps


def test_markers_stop_where_they_would_hide_the_line():
    rows = [_train_row(s, 200) for s in range(1, MARKERS_UP_TO + 2)]
    ((_, _, marker),) = _curves(curves_figure(rows).axes[0])
    assert marker in ("None", "", None)


def test_no_evaluations_and_no_training_steps_are_said(tmp_path):
    fig = curves_figure([_train_row(1, 3), _train_row(2, 3)])
    assert [t.get_text() for t in fig.axes[1].texts] == ["no evaluations"] and not fig.axes[1].get_lines()
    metrics = _write(tmp_path / "metrics.jsonl", [{"step": 1, "eval_loss": 1.0, "eval_ppl": math.e}])
    note = plot_metrics(metrics, tmp_path / "curves.png")
    assert note == "no training curves PNG: metrics.jsonl has no training steps"
    assert not (tmp_path / "curves.png").exists()


def test_one_step_run_plots_the_eval_loss_it_prints(tiny_model_dir, tmp_path, capsys):
    """`velotune train` without eval_steps evaluates once at the end: that eval loss is a metrics row and a dot."""
    from velotune.cli.main import main
    from velotune.train.config import PACKAGE_DATA

    data, out = str(PACKAGE_DATA / "iso_dates_eval.jsonl"), tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_dir), "--dataset", data, "--eval_dataset", data, "--max_steps", "1"]
    argv += ["--per_device_train_batch_size", "2", "--compare_samples", "0", "--no_progress", "--output_dir", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (final,) = [r for r in rows if "eval_loss" in r]
    assert final["step"] == 1 and f"eval loss {final['eval_loss']:.4f}" in printed
    _check_png(out / "training_curves.png")
    ((xs, ys, marker),) = _curves(curves_figure(rows).axes[1])
    assert (xs, ys, marker) == ([1], [final["eval_loss"]], "o")
