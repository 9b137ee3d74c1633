"""Paths a request names, held to the runs directory: nothing outside it is ever read or served."""

from __future__ import annotations

from pathlib import Path


class Refused(Exception):  # noqa: N818  (a refusal answered with 403, not an error of ours)
    """A request for a path outside the runs directory."""


class NotFound(Exception):  # noqa: N818
    """A request for a run or file that is not there."""


def inside(root: Path, relative: str) -> Path:
    """`root`/`relative` resolved (symbolic links followed), refused unless it stays inside `root`."""
    if "\x00" in relative or Path(relative).is_absolute():
        raise Refused(relative)
    path = (root / relative).resolve()
    if path != root and root not in path.parents:
        raise Refused(relative)
    return path
