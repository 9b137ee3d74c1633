"""status.json in a run directory: what the run is doing (running, finished, failed, interrupted), written by the
run itself so that a reader (`velotune dashboard`) need not guess.

  {"status": "running", "pid": 1234, "host": "gpu-7", "updated": 1767000000.0, ...}

Extra fields: `planned_gpu_memory_gib` (running, on CUDA), `resume_command` (interrupted), `error` (failed). A
process killed with SIGKILL cannot write anything: its file still says running, with a pid that no longer lives.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

STATUS = "status.json"
STATES = ("running", "finished", "failed", "interrupted")


def write_status(run_dir: Path, status: str, **fields: Any) -> None:
    """Replace `run_dir`/status.json atomically (write, then rename: a reader never sees half a file)."""
    assert status in STATES, status
    row = {"status": status, "pid": os.getpid(), "host": socket.gethostname(), "updated": time.time(), **fields}
    tmp = run_dir / f".{STATUS}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(row, indent=1))
    os.replace(tmp, run_dir / STATUS)
