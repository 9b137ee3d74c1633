"""What a training method supplies to the one training loop: how examples become a batch, the loss of a
micro-batch under a global normaliser, the step's metrics, and evaluation.

The loop (train/loop.py) owns everything generic: the step-indexed data order, micro-batches, accumulation, the
all-reduce of the normalisers over ranks, out-of-memory halving, non-finite skips, checkpoints and exact resume,
signals and metrics. An objective never calls backward and never sees the optimizer.

Normalisers: `counts(batch)` returns this micro-batch's units (target tokens, pairs, ...); the loop sums them over
the step's micro-batches and all ranks and hands the totals to `loss`, which divides by them. So accumulation and
data parallelism give the update of one large batch whatever the split. Metrics are returned as sums over the
micro-batch's `metric_unit` and averaged the same way.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Objective:
    """Base class; the SFT objective (objectives/sft.py) is the simplest example."""

    name = "objective"
    metric_unit = "targets"  # the count that metric sums are divided by
    inputs: tuple[str, ...] = ()  # batch keys moved to the device
    rows_per_example = 1  # training rows one dataset example becomes (GRPO: num_generations completions)
    iterations = 1  # optimizer steps each step's rows are trained for (GRPO's num_iterations)

    def setup(self, model: nn.Module) -> None:
        """Called once by the Trainer with the (unwrapped) model being trained."""
        self.model = model

    def prepare_step(self, examples: list[dict], step: int) -> list[dict]:
        """The training rows of optimizer step `step` from its dataset examples (identity; GRPO generates and scores
        completions here). Called once per step, before micro-batches are cut."""
        return examples

    def step_info(self) -> dict:
        """Metrics of the last prepared step for its metrics row (GRPO: rewards, lengths, timings); a "samples"
        entry holds example completions to print and record."""
        return {}

    def state_dict(self) -> dict:
        """JSON-serialisable state a checkpoint must carry for an exact resume."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def length(self, example: dict) -> int:
        """Tokens of the longest sequence this example becomes (OOM messages, micro-batch search)."""
        raise NotImplementedError

    def collate(
        self, examples: list[dict], pad_id: int, packing: bool = False, max_seq_length: int | None = None
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        """This micro-batch's normalising units."""
        raise NotImplementedError

    def loss(
        self, module: nn.Module, batch: dict[str, torch.Tensor], totals: dict[str, int]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(this micro-batch's share of the step loss, metric sums); `module` is what to call (DDP wrapper or the
        model), `totals` the step's counts over all micro-batches and ranks."""
        raise NotImplementedError

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["attention_mask"].sum())

    @torch.no_grad()
    def evaluate(self, examples: Sequence[dict], pad_id: int, batch_size: int) -> dict[str, float]:
        """Eval metrics over `examples` with the model in eval mode; `eval_loss` is the one early stopping reads."""
        was_training = self.model.training
        self.model.eval()
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        batches = []  # collated on the host; each goes to the device only while it is evaluated
        for i in range(0, len(examples), batch_size):
            b = self.collate(list(examples[i : i + batch_size]), pad_id)
            batches.append({k: v for k, v in b.items() if k in self.inputs})
        for b in batches:
            for k, v in self.counts(b).items():
                counts[k] = counts.get(k, 0) + v
        totals = {k: max(v, 1) for k, v in counts.items()}
        for host in batches:
            b = {k: v.to(self.model.device) for k, v in host.items()}
            loss, metrics = self.loss(self.model, b, totals)
            sums["loss"] = sums.get("loss", 0.0) + float(loss)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v
        self.model.train(was_training)
        unit = totals.get(self.metric_unit, 1)
        return {"eval_loss": sums.get("loss", 0.0)} | {f"eval_{k}": v / unit for k, v in sums.items() if k != "loss"}
