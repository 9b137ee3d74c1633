"""A run's status from what it wrote: status.json (runs since velotune 0.1 write it), checked against the process
it names; older runs by their files."""

from __future__ import annotations

import json
import os
import shlex
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from velotune.train.checkpoint import list_checkpoints
from velotune.train.status import STATUS

FRESH_S = 120  # a run without status.json whose metrics.jsonl changed this recently counts as running


@dataclass
class RunStatus:
    status: str  # running | finished | failed | interrupted
    note: str = ""  # why, in a sentence
    resume_command: str | None = None
    started: float | None = None
    planned_gpu_memory_gib: float | None = None


def read_status_file(run_dir: Path) -> dict[str, Any]:
    try:
        values = json.loads((run_dir / STATUS).read_text())
    except (OSError, ValueError):
        return {}
    return values if isinstance(values, dict) else {}


def process_alive(pid: Any, host: Any) -> bool | None:
    """Whether process `pid` of `host` still runs; None when that cannot be told from here (another host)."""
    if host != socket.gethostname():
        return None
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def resume_command(run_dir: Path) -> str:
    """The command that continues a run from its newest checkpoint (the checkpoint holds its settings)."""
    return shlex.join(["velotune", "train", "--output_dir", str(run_dir), "--resume"])


def run_status(run_dir: Path) -> RunStatus:
    written = read_status_file(run_dir)
    checkpoints = list_checkpoints(run_dir)
    started = _started(run_dir)
    state = written.get("status")
    planned = written.get("planned_gpu_memory_gib")
    if state == "running":
        alive = process_alive(written.get("pid"), written.get("host"))
        if alive is False:
            return _gone(run_dir, checkpoints, started, f"process {written.get('pid')} ended without a word (killed?)")
        where = "" if alive else f" on {written.get('host')}"
        return RunStatus("running", f"process {written.get('pid')}{where}", None, started, planned)
    if state == "interrupted":
        command = written.get("resume_command") or (resume_command(run_dir) if checkpoints else None)
        return RunStatus("interrupted", str(written.get("message", "")), command, started, planned)
    if state in ("finished", "failed"):
        note = str(written.get("error", "")) if state == "failed" else ""
        command = resume_command(run_dir) if state == "failed" and checkpoints else None
        return RunStatus(state, note, command, started, planned)
    return _unwritten(run_dir, checkpoints, started)


def _started(run_dir: Path) -> float | None:
    try:
        return (run_dir / "config.yaml").stat().st_mtime
    except OSError:
        return None


def _gone(run_dir: Path, checkpoints: list[Path], started: float | None, why: str) -> RunStatus:
    if checkpoints:
        note = f"{why}; resumable from {checkpoints[-1].name}"
        return RunStatus("interrupted", note, resume_command(run_dir), started)
    return RunStatus("failed", f"{why}; no checkpoint was written", None, started)


def _unwritten(run_dir: Path, checkpoints: list[Path], started: float | None) -> RunStatus:
    """Runs of velotune versions without status.json."""
    if (run_dir / "summary.json").exists():
        return RunStatus("finished", "", None, started)
    try:
        fresh = time.time() - (run_dir / "metrics.jsonl").stat().st_mtime < FRESH_S
    except OSError:
        fresh = False
    if fresh:
        return RunStatus("running", "metrics.jsonl is being written", None, started)
    return _gone(run_dir, checkpoints, started, "the run stopped before its end")
