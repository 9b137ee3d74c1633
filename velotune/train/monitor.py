"""Training monitor: notices what usually means wasted GPU hours and says which setting to change, and to what.

Checks, each reported at most once per COOLDOWN steps:
- gradient norm above GRAD_NORM_LIMIT (before clipping): updates too large -> lower learning_rate;
- loss oscillation: the loss goes up and down on most steps by a large fraction of its level (the higher of now and
  the start, so the harmless wobble of a converged loss near zero is no alarm) -> lower learning_rate
  or average over more examples (gradient_accumulation_steps);
- loss not falling: the last WINDOW steps average no lower than the first WINDOW after warmup -> raise learning_rate;
- eval loss rising: an evaluation above the best so far -> over-fitting; with early_stopping_patience the run stops
  after that many evaluations without a new best.
The state is plain data, so a resumed run continues the same checks.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

GRAD_NORM_LIMIT = 10.0
WINDOW = 20
COOLDOWN = 50
OSCILLATION_FLIPS = 0.7  # share of consecutive loss changes that reverse direction
OSCILLATION_SWING = 0.15  # mean |change| relative to the mean loss
PLATEAU_RATIO = 0.98  # last window's mean / first window's mean at or above this: not falling


@dataclass
class Notice:
    step: int
    kind: str  # grad_norm | oscillation | plateau | eval_rising | early_stop
    message: str

    def row(self) -> dict:
        return {"step": self.step, "warning": self.kind, "message": self.message}


@dataclass
class MonitorState:
    first: list[float] = field(default_factory=list)  # the first WINDOW losses after warmup
    recent: list[float] = field(default_factory=list)  # the last WINDOW losses
    last_warned: dict[str, int] = field(default_factory=dict)  # kind -> step
    evals_without_best: int = 0
    best_eval: float | None = None
    best_eval_step: int | None = None


class TrainingMonitor:
    def __init__(
        self, learning_rate: float, accumulation: int, warmup: int, max_grad_norm: float, patience: int = 0
    ) -> None:
        self.lr, self.accumulation, self.warmup = learning_rate, accumulation, warmup
        self.max_grad_norm, self.patience = max_grad_norm, patience
        self.state = MonitorState()

    def state_dict(self) -> dict:
        return asdict(self.state)

    def load_state_dict(self, values: dict) -> None:
        self.state = MonitorState(**values) if values else MonitorState()

    def _due(self, kind: str, step: int) -> bool:
        last = self.state.last_warned.get(kind)
        if last is not None and step - last < COOLDOWN:
            return False
        self.state.last_warned[kind] = step
        return True

    def observe(self, step: int, loss: float, grad_norm: float) -> list[Notice]:
        """Warnings raised by one finished optimizer step."""
        s, out = self.state, []
        if grad_norm > GRAD_NORM_LIMIT and self._due("grad_norm", step):
            clip = "" if self.max_grad_norm > 0 else "; also set max_grad_norm: 1.0 (clipping is off)"
            out.append(
                Notice(
                    step,
                    "grad_norm",
                    f"gradient norm {grad_norm:.1f} at step {step} is above {GRAD_NORM_LIMIT:g}: updates are too "
                    f"large; lower learning_rate from {self.lr:.1e} to {self.lr / 3:.1e}{clip}",
                )
            )
        if step <= self.warmup:
            return out
        if len(s.first) < WINDOW:
            s.first.append(loss)
        s.recent = (s.recent + [loss])[-WINDOW:]
        if len(s.recent) == WINDOW:
            out += self._oscillation(step) + self._plateau(step)
        return out

    def _oscillation(self, step: int) -> list[Notice]:
        losses = self.state.recent
        diffs = [b - a for a, b in zip(losses, losses[1:], strict=False)]
        flips = sum(1 for a, b in zip(diffs, diffs[1:], strict=False) if a * b < 0) / max(1, len(diffs) - 1)
        # relative to the loss level where training started (after warmup), not today's: a converged loss of 0.05
        # that wobbles by 0.01 is 20% of its level but harmless, while a swing of 0.5 around 1.5 is not
        level = max(statistics.fmean(losses), self.state.first[0] if self.state.first else 0.0)
        swing = statistics.fmean(abs(d) for d in diffs) / max(level, 1e-8)
        half = len(losses) // 2
        falling = statistics.fmean(losses[half:]) < (1 - OSCILLATION_SWING) * statistics.fmean(losses[:half])
        if flips < OSCILLATION_FLIPS or swing < OSCILLATION_SWING or falling or not self._due("oscillation", step):
            return []  # a noisy loss that still falls clearly (small preference batches) is no oscillation
        return [
            Notice(
                step,
                "oscillation",
                f"loss oscillates (changes direction on {flips:.0%} of the last {WINDOW} steps, by {swing:.0%} of "
                f"its level): lower learning_rate from {self.lr:.1e} to {self.lr / 2:.1e}, or raise "
                f"gradient_accumulation_steps from {self.accumulation} to {self.accumulation * 2}",
            )
        ]

    def _plateau(self, step: int) -> list[Notice]:
        s = self.state
        if len(s.first) < WINDOW or step < self.warmup + 2 * WINDOW:
            return []
        first, last = statistics.fmean(s.first), statistics.fmean(s.recent)
        if last < PLATEAU_RATIO * first or not self._due("plateau", step):
            return []
        return [
            Notice(
                step,
                "plateau",
                f"loss is not falling (mean {last:.4f} over the last {WINDOW} steps vs {first:.4f} over the first "
                f"{WINDOW}): raise learning_rate from {self.lr:.1e} to {self.lr * 3:.1e}, or check that the "
                "data's targets are what the model should learn (velotune data inspect)",
            )
        ]

    def observe_eval(self, step: int, eval_loss: float) -> tuple[list[Notice], bool]:
        """(warnings, stop): stop is True when early stopping ends the run."""
        s = self.state
        if s.best_eval is None or eval_loss < s.best_eval:
            s.best_eval, s.best_eval_step, s.evals_without_best = eval_loss, step, 0
            return [], False
        s.evals_without_best += 1
        if self.patience and s.evals_without_best >= self.patience:
            return [
                Notice(
                    step,
                    "early_stop",
                    f"early stopping at step {step}: eval loss has not improved for {s.evals_without_best} "
                    f"evaluations (best {s.best_eval:.4f} at step {s.best_eval_step}); the best checkpoint is kept",
                )
            ], True
        hint = "" if self.patience else "; set early_stopping_patience: 3 to stop such runs by themselves"
        return [
            Notice(
                step,
                "eval_rising",
                f"eval loss rose to {eval_loss:.4f} at step {step} (best {s.best_eval:.4f} at step "
                f"{s.best_eval_step}): the model is over-fitting; train fewer steps (max_steps: {s.best_eval_step}) "
                f"or raise lora_dropout to 0.1{hint}",
            )
        ], False
