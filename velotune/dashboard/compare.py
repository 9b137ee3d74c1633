"""Compare: the settings in which runs differ."""

from __future__ import annotations

from typing import Any

SAME_BY_NATURE = ("output_dir", "resume")  # differ between any two runs without saying anything


def config_differences(configs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """[{"key", "values": {run: value or None}}] for each key whose value is not the same in every run."""
    keys = sorted({k for config in configs.values() for k in config} - set(SAME_BY_NATURE))
    out = []
    for key in keys:
        values = {run: config.get(key) for run, config in configs.items()}
        if len({repr(v) for v in values.values()}) > 1:
            out.append({"key": key, "values": values})
    return out
