"""The environment variables velotune reads, in one place (the README's table lists them).

Launcher variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR ...) are parsed as a whole by train/distributed.py;
`world_size()` here is the one read outside it, for checks made before the process group exists.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

CACHE = "VELOTUNE_CACHE"  # cache root: tokenized data, converted GGUF tokenizers
FLEX_MODE = "VELOTUNE_FLEX_MODE"  # torch.compile mode for FlexAttention, e.g. max-autotune-no-cudagraphs
FLEX_OPTIONS = "VELOTUNE_FLEX_OPTIONS"  # JSON kernel_options for FlexAttention, replacing velotune's tile table
FAULTS = "VELOTUNE_FAULTS"  # faults injected into a training run (tests of resume and recovery)


def cache_home() -> Path:
    """$VELOTUNE_CACHE, else ~/.cache/velotune."""
    root = os.environ.get(CACHE)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "velotune"


def flex_mode() -> str | None:
    return os.environ.get(FLEX_MODE) or None


def flex_options() -> dict[str, Any] | None:
    override = os.environ.get(FLEX_OPTIONS)
    return json.loads(override) if override else None


def faults_spec() -> str:
    return os.environ.get(FAULTS, "")


def world_size() -> int:
    """Processes of this launch (1 outside torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launch_position() -> tuple[str, str]:
    """(RANK, WORLD_SIZE) as the launcher set them, "?" where unset: for naming a failed process."""
    return os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
