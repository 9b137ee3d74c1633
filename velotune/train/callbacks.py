"""Hooks into the training loop at fixed points of a step, for code that watches or perturbs a run without the loop
knowing about it (train/faults.py injects failures through them; integrations could log through them)."""

from __future__ import annotations

import torch


class TrainerCallback:
    """No-op hooks; subclasses override what they need."""

    def on_micro_batch_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The micro-batch's loss before backward (returned, possibly changed)."""
        return loss

    def on_micro_batch_end(self, step: int, index: int) -> None:
        """After the backward of micro-batch `index` (0-based) of step `step`."""

    def on_step_logged(self, step: int) -> None:
        """After the step's metrics are written, before evaluation and checkpoint."""

    def on_checkpoint_written(self, step: int) -> None:
        """Halfway through writing checkpoint-`step` (weights written, the rest not yet)."""

    def on_step_end(self, step: int, rank: int) -> None:
        """After the step's evaluation and checkpoint."""
