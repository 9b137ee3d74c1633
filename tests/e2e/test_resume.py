"""Training left overnight: a `velotune train` process killed with SIGKILL, also while it writes a checkpoint, resumes
with --resume and produces the loss curve of the run that was never interrupted; SIGINT stops at a step boundary
with a checkpoint and prints the command that resumes.

The killed runs are real subprocesses (`python -m velotune train`); the uninterrupted and resumed runs go through
the same CLI in this process. Every run uses one CPU thread, so the float32 results are comparable.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from velotune.cli.main import main
from velotune.train.checkpoint import list_checkpoints, load_checkpoint
from velotune.train.config import PACKAGE_DATA

ROOT = Path(__file__).resolve().parents[2]


def _args(model_dir: Path, out: Path, steps: int = 30) -> list[str]:
    return [
        "train",
        "--model",
        str(model_dir),
        "--dataset",
        str(PACKAGE_DATA / "iso_dates_eval.jsonl"),
        "--max_steps",
        str(steps),
        "--per_device_train_batch_size",
        "2",
        "--save_steps",
        "5",
        "--learning_rate",
        "1e-2",
        "--compare_samples",
        "0",
        "--no_progress",
        "--output_dir",
        str(out),
    ]


def _in_process(args: list[str]) -> int:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(args)
    finally:
        torch.set_num_threads(threads)


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)), f"steps logged out of order or twice: {steps}"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _kill_when(args: list[str], faults: str, ready, log: Path, timeout: float = 180.0) -> None:
    """Start `python -m velotune` with VELOTUNE_FAULTS, SIGKILL it once ready() is true."""
    env = dict(os.environ, OMP_NUM_THREADS="1", VELOTUNE_FAULTS=faults, PYTHONPATH=str(ROOT))
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "velotune", *args], cwd=ROOT, env=env, stdout=err, stderr=err)
        deadline = time.monotonic() + timeout
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"the run ended or hung before the kill point:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)
        proc.kill()  # SIGKILL: no handler runs, nothing is flushed
        proc.wait()


def _logged(run_dir: Path, step: int):
    def ready() -> bool:
        path = run_dir / "metrics.jsonl"
        return path.exists() and any(json.loads(x).get("step") == step for x in path.read_text().splitlines() if x)

    return ready


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, tmp_path_factory) -> dict[int, float]:
    out = tmp_path_factory.mktemp("uninterrupted")
    assert _in_process(_args(tiny_model_dir, out)) == 0
    losses = _losses(out)
    assert sorted(losses) == list(range(1, 31))
    return losses


def _assert_same_curve(resumed: dict[int, float], reference: dict[int, float]) -> None:
    assert sorted(resumed) == sorted(reference)
    worst = max(abs(resumed[s] - reference[s]) for s in reference)
    assert worst <= 1e-6, f"resumed loss curve differs by {worst}"


def test_sigkill_after_step_15_resumes_with_the_same_loss_curve(tiny_model_dir, tmp_path, uninterrupted):
    run = tmp_path / "run"
    # stall@15: the run waits after logging step 15 (before that step's checkpoint), where it is killed
    _kill_when(_args(tiny_model_dir, run), "stall@15:120", _logged(run, 15), tmp_path / "killed.log")
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-5", "checkpoint-10"]
    assert max(_losses(run)) == 15  # steps 11-15 were logged after the last checkpoint: resume must redo them
    assert _in_process(_args(tiny_model_dir, run) + ["--resume"]) == 0
    _assert_same_curve(_losses(run), uninterrupted)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed_from"].endswith("checkpoint-10") and summary["steps"] == 30


def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(tiny_model_dir, tmp_path, uninterrupted):
    run = tmp_path / "run"

    def writing_checkpoint_10() -> bool:
        return any((p / "trainable.safetensors").exists() for p in run.glob(".checkpoint-10.tmp-*"))

    _kill_when(_args(tiny_model_dir, run), "checkpoint_pause@10:120", writing_checkpoint_10, tmp_path / "killed.log")
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-5"]  # the half-written one is not a checkpoint
    previous = load_checkpoint(run / "checkpoint-5")
    assert previous.state.step == 5 and previous.weights
    assert _in_process(_args(tiny_model_dir, run) + ["--resume"]) == 0
    assert not list(run.glob(".checkpoint-*"))  # the leftover temporary directory is cleaned up
    _assert_same_curve(_losses(run), uninterrupted)


def test_sigint_checkpoints_and_prints_the_command_that_resumes(tiny_model_dir, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    monkeypatch.setenv("VELOTUNE_FAULTS", "signal@3:INT")
    assert _in_process(_args(tiny_model_dir, run, steps=6)) == 130
    err = capsys.readouterr().err
    assert "SIGINT received: stopped after step 3" in err
    command = err.split("resume with:\n", 1)[1].strip().splitlines()[0]
    assert command.startswith("velotune train ") and command.endswith("--resume --no_progress")
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-3"]
    monkeypatch.delenv("VELOTUNE_FAULTS")
    assert _in_process(shlex.split(command)[1:]) == 0
    assert sorted(_losses(run)) == list(range(1, 7))


def test_resume_with_nothing_to_resume_says_so(tiny_model_dir, tmp_path, capsys):
    assert main(_args(tiny_model_dir, tmp_path / "empty") + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "does not exist" in err and "without --resume" in err
