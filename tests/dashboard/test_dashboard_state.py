"""What the dashboard reads from a run directory, without a browser: metrics.jsonl as it grows (bad lines skipped
and counted), a run's status from status.json and the process it names, and the command's clear errors."""

from __future__ import annotations

import fnmatch
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import tomllib

import velotune.dashboard
from velotune.cli.main import main
from velotune.dashboard.metrics import MetricsFile
from velotune.dashboard.paths import Refused, inside
from velotune.dashboard.runs import RunsDir
from velotune.dashboard.status import run_status
from velotune.train.status import write_status


def test_metrics_reader_skips_bad_lines_and_waits_for_half_written_ones(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "loss": 2.0}\nnot json\n[1, 2]\n{"loss": 1.0}\n{"step": 2, "loss": NaN}\n{"step": 3, "lo'
    )
    metrics = MetricsFile(path).refresh()
    assert [r["step"] for r in metrics.rows] == [1, 2]
    assert metrics.bad_lines == 3 and metrics.pending  # not JSON, not an object, no step; the last line waits
    assert metrics.since(1) == [{"step": 2, "loss": None}]  # NaN travels as null
    with open(path, "a") as f:
        f.write('ss": 1.5}\n{"step": 4, "loss": 1.4}\n')
    metrics.refresh()
    assert [r["step"] for r in metrics.rows] == [1, 2, 3, 4] and not metrics.pending and metrics.bad_lines == 3


def test_metrics_reader_starts_over_when_the_file_is_rewritten(tmp_path):
    """A resumed run copies its checkpoint's metrics back over the file: the reader must not keep the old rows."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6)))
    metrics = MetricsFile(path).refresh()
    generation = metrics.generation
    path.write_text("".join(json.dumps({"step": s, "loss": 9.0}) + "\n" for s in range(1, 7)))  # longer, other bytes
    metrics.refresh()
    assert metrics.generation == generation + 1
    assert [r["loss"] for r in metrics.rows] == [9.0] * 6


def test_status_of_a_killed_run_is_interrupted_with_a_checkpoint_else_failed(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("max_steps: 10\n")
    (run / "status.json").write_text(json.dumps({"status": "running", "pid": dead.pid, "host": socket.gethostname()}))
    status = run_status(run)
    assert status.status == "failed" and f"process {dead.pid} ended" in status.note
    checkpoint = run / "checkpoint-5"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text("{}")
    status = run_status(run)
    assert status.status == "interrupted" and "checkpoint-5" in status.note
    assert status.resume_command == f"velotune train --output_dir {run} --resume"
    write_status(run, "running")  # this process: alive
    assert run_status(run).status == "running"


def test_runs_are_found_below_the_directory_but_not_inside_runs(tmp_path):
    for name in ("a", "group/b", "group/c/checkpoint-1"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "config.yaml").write_text("max_steps: 1\n")
    (tmp_path / "notes").mkdir()
    runs = RunsDir(tmp_path)
    assert sorted(runs.name(p) for p in runs.find()) == ["a", "group/b"]
    assert runs.row(runs.run("group/b"))["max_steps"] == 1


def test_paths_outside_the_runs_directory_are_refused(tmp_path):
    for bad in ("..", "../x", "/etc/passwd", "a/../../x", "a\x00b"):
        try:
            inside(tmp_path, bad)
        except Refused:
            continue
        raise AssertionError(f"{bad!r} was not refused")
    assert inside(tmp_path, "a/../b") == tmp_path.resolve() / "b"


def test_port_in_use_is_one_clear_message(tmp_path, capsys):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        assert main(["dashboard", str(tmp_path), "--port", str(port)]) == 2
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert f"port {port} on 127.0.0.1 is in use" in err and "--port" in err and "Traceback" not in err


def test_missing_runs_directory_is_one_clear_message(tmp_path, capsys):
    assert main(["dashboard", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"velotune: error: {tmp_path / 'nope'} does not exist")


def test_page_assets_ship_in_the_wheel_and_load_from_it():
    """Every static file matches pyproject's package-data, and the page asks for nothing from another host."""
    package = Path(velotune.__file__).parent
    static = Path(velotune.dashboard.__file__).parent / "static"
    pyproject = tomllib.loads((package.parent / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["velotune"]
    files = [p.relative_to(package).as_posix() for p in static.rglob("*") if p.is_file()]
    assert "dashboard/static/vendor/uPlot.iife.min.js" in files and "dashboard/static/vendor/uPlot.LICENSE" in files
    assert [f for f in files if not any(fnmatch.fnmatch(f, g) for g in globs)] == []
    urls = re.findall(r'(?:src|href)="([^"]+)"', (static / "index.html").read_text())
    assert "static/vendor/uPlot.iife.min.js" in urls and not [u for u in urls if re.match(r"([a-z]+:)?//", u)]


def test_unreadable_run_files_are_reported_not_raised(tmp_path):
    run = tmp_path / "odd"
    (run / "metrics.jsonl").mkdir(parents=True)  # a directory where the file should be
    (run / "config.yaml").write_text("model_name_or_path: m\nstarted: 2024-01-01\n")  # a date: no JSON type
    (run / "summary.json").write_text("{half")
    runs = RunsDir(tmp_path)
    row = runs.row(runs.run("odd"))
    assert row["step"] == 0 and row["model"] == "m" and row["bad_lines"] == 0
    details = runs.details(runs.run("odd"))
    assert details["config"]["started"] == "2024-01-01" and details["summary"] is None
    json.dumps(details, allow_nan=False)  # what the page gets is strict JSON
