"""Failures injected on purpose, so tests can drive the recovery paths that real runs reach only by bad luck.

A Trainer holds a Faults (empty by default: nothing happens). Tests build one directly, or, for a `velotune train`
subprocess, the CLI parses it from the VELOTUNE_FAULTS environment variable, a comma-separated list of
`kind@step[:value]`:

  nonfinite@5            step 5's loss (and so its gradients) becomes NaN
  oom@3                  step 3's first attempt raises a simulated CUDA out-of-memory error after one micro-batch
  signal@7:TERM          after step 7, this process sends itself SIGTERM (or INT)
  checkpoint_pause@10:30 writing checkpoint-10 stops for 30 s halfway (weights written, the rest not yet)
  stall@15:30            after step 15 is logged, before its checkpoint, the run stops for 30 s (a test can kill
                         it there without racing a run that would otherwise finish in a second)
  crash@4:1              after step 4 (and its checkpoint), the process of rank 1 raises an error (a rank dying)
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field

import torch

from velotune.errors import ConfigError
from velotune.train.callbacks import TrainerCallback

KINDS = ("nonfinite", "oom", "signal", "checkpoint_pause", "stall", "crash")


class OutOfMemoryError(RuntimeError):
    """A simulated out-of-memory error; recovery code recognises it by its name, as it does torch.cuda's."""


@dataclass
class Faults(TrainerCallback):
    nonfinite_steps: set[int] = field(default_factory=set)
    oom_steps: set[int] = field(default_factory=set)
    signal_steps: dict[int, int] = field(default_factory=dict)  # step -> signal number
    checkpoint_pause: dict[int, float] = field(default_factory=dict)  # checkpoint step -> seconds
    stall_steps: dict[int, float] = field(default_factory=dict)  # step -> seconds
    crash_steps: dict[int, int] = field(default_factory=dict)  # step -> rank that fails
    _fired: set[tuple[str, int]] = field(default_factory=set, repr=False)

    @classmethod
    def parse(cls, text: str) -> Faults:
        faults = cls()
        for item in filter(None, (part.strip() for part in text.split(","))):
            kind, _, rest = item.partition("@")
            step_text, _, value = rest.partition(":")
            if kind not in KINDS or not step_text.isdigit():
                raise ConfigError(f"fault {item!r}: expected kind@step[:value] with kind one of {', '.join(KINDS)}")
            step = int(step_text)
            if kind == "nonfinite":
                faults.nonfinite_steps.add(step)
            elif kind == "oom":
                faults.oom_steps.add(step)
            elif kind == "stall":
                faults.stall_steps[step] = float(value or 60)
            elif kind == "crash":
                faults.crash_steps[step] = int(value or 0)
            elif kind == "signal":
                faults.signal_steps[step] = int(getattr(signal, f"SIG{value or 'TERM'}"))
            else:
                faults.checkpoint_pause[step] = float(value or 60)
        return faults

    def once(self, kind: str, step: int) -> bool:
        """True the first time (kind, step) is asked about, if that fault is set for the step."""
        armed = {"oom": self.oom_steps, "checkpoint_pause": self.checkpoint_pause, "stall": self.stall_steps}[kind]
        if step not in armed or (kind, step) in self._fired:
            return False
        self._fired.add((kind, step))
        return True

    # ---- the TrainerCallback hooks ----

    def on_micro_batch_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if step in self.nonfinite_steps else loss

    def on_micro_batch_end(self, step: int, index: int) -> None:
        if index == 0 and self.once("oom", step):  # after gradients exist, as a real OOM would
            raise OutOfMemoryError(f"simulated CUDA out of memory at step {step}")

    def on_checkpoint_written(self, step: int) -> None:
        if self.once("checkpoint_pause", step):
            time.sleep(self.checkpoint_pause[step])

    def on_step_logged(self, step: int) -> None:
        if self.once("stall", step):
            time.sleep(self.stall_steps[step])

    def on_step_end(self, step: int, rank: int) -> None:
        if step in self.signal_steps:
            signal.raise_signal(self.signal_steps[step])
        if self.crash_steps.get(step) == rank:
            raise RuntimeError(f"injected failure of rank {rank} after step {step}")
