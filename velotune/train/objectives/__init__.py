"""Training methods as objectives of the one loop: `velotune train --method sft|dpo|orpo|simpo`."""

from __future__ import annotations

from typing import Any

from velotune.errors import ConfigError
from velotune.train.objectives.base import Objective
from velotune.train.objectives.preference import DPO, ORPO, PreferenceObjective, SimPO
from velotune.train.objectives.sft import SFT

METHODS = ("sft", "dpo", "orpo", "simpo")


def build_objective(cfg: Any) -> Objective:
    """The objective a TrainConfig names (method, beta, loss_type, label_smoothing, simpo_gamma)."""
    method = getattr(cfg, "method", "sft")
    if method == "sft":
        return SFT()
    if method == "dpo":
        return DPO(cfg.beta, cfg.loss_type, cfg.label_smoothing)
    if method == "orpo":
        return ORPO(cfg.beta, cfg.label_smoothing)
    if method == "simpo":
        return SimPO(cfg.beta, cfg.label_smoothing, cfg.simpo_gamma)
    raise ConfigError(f"method {method!r} is not one of {', '.join(METHODS)}")


__all__ = ["DPO", "METHODS", "ORPO", "SFT", "Objective", "PreferenceObjective", "SimPO", "build_objective"]
