"""The training loop: micro-batches, gradient accumulation normalised by target tokens, clipping, schedule, logs.

The loss of an optimizer step is sum(token losses over all its micro-batches) / (target tokens in all of them),
so accumulation 4 x batch 1 gives the same update as batch 4 x accumulation 1 whatever the sequence lengths.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from velotune.data import collate
from velotune.models.decoder import CausalLM, count_targets
from velotune.train.config import TrainConfig
from velotune.train.optim import build_optimizer, build_scheduler


@dataclass
class TrainResult:
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class Trainer:
    """Trains `model` (its parameters with requires_grad) on tokenized examples."""

    def __init__(
        self,
        model: CausalLM,
        examples: Sequence[dict],
        cfg: TrainConfig,
        pad_id: int,
        run_dir: Path | None = None,
        packing: bool = False,
        max_seq_length: int | None = None,
        progress: bool = True,
    ) -> None:
        self.model, self.examples, self.cfg = model, examples, cfg
        self.pad_id, self.packing, self.max_seq_length = pad_id, packing, max_seq_length
        self.run_dir, self.progress = run_dir, progress
        per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        self.steps_per_epoch = max(1, math.ceil(len(examples) / per_step))
        self.total_steps = (
            cfg.max_steps if cfg.max_steps > 0 else math.ceil(self.steps_per_epoch * cfg.num_train_epochs)
        )
        self.optimizer = build_optimizer(model.parameters(), cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)

    def _order(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.cfg.seed + epoch)
        return torch.randperm(len(self.examples), generator=gen).tolist()

    def step_batches(self) -> Iterator[list[list[dict]]]:
        """For each optimizer step, its micro-batches (lists of examples), epoch after epoch."""
        bs, acc = self.cfg.per_device_train_batch_size, self.cfg.gradient_accumulation_steps
        epoch = 0
        while True:
            order = self._order(epoch)
            for s in range(self.steps_per_epoch):
                idx = order[s * bs * acc : (s + 1) * bs * acc]
                if not idx:
                    break
                yield [[self.examples[i] for i in idx[m : m + bs]] for m in range(0, len(idx), bs)]
            epoch += 1

    def _batch(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        batch = collate(examples, self.pad_id, packing=self.packing, max_seq_length=self.max_seq_length)
        return {k: v.to(self.model.device) for k, v in batch.items() if k in _MODEL_INPUTS}

    def accumulate(self, micro_batches: list[list[dict]]) -> tuple[float, int]:
        """Forward + backward of one optimizer step's micro-batches; returns (loss, tokens).

        Each micro-batch's summed token loss is divided by the target tokens of ALL micro-batches of the step.
        """
        batches = [self._batch(mb) for mb in micro_batches]
        n_targets = sum(count_targets(b["labels"], b["position_ids"]) for b in batches)
        loss_total, tokens = 0.0, 0
        for b in batches:
            out = self.model(**b, num_items_in_batch=max(n_targets, 1))
            out.loss.backward()
            loss_total += float(out.loss.detach())
            tokens += int(b["attention_mask"].sum())
        return loss_total, tokens

    def train_step(self, micro_batches: list[list[dict]]) -> tuple[float, float, int]:
        """One optimizer step; returns (loss, grad norm, tokens)."""
        loss, tokens = self.accumulate(micro_batches)
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, tokens

    def train(self) -> TrainResult:
        self.model.train()
        result = TrainResult()
        log = open(self.run_dir / "metrics.jsonl", "a") if self.run_dir else None  # noqa: SIM115
        bar = tqdm(total=self.total_steps, desc="training", unit="step", disable=not self.progress)
        start = time.perf_counter()
        try:
            for step, micro in enumerate(self.step_batches(), start=1):
                lr = self.scheduler.get_last_lr()[0]
                loss, grad_norm, tokens = self.train_step(micro)
                result.losses.append(loss)
                result.tokens += tokens
                result.steps = step
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                if log and (step % self.cfg.logging_steps == 0 or step == self.total_steps):
                    row = {
                        "step": step,
                        "loss": loss,
                        "lr": lr,
                        "grad_norm": grad_norm,
                        "tokens": result.tokens,
                        "elapsed_s": round(time.perf_counter() - start, 3),
                    }
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                if step >= self.total_steps:
                    break
        finally:
            bar.close()
            if log:
                log.close()
        result.seconds = time.perf_counter() - start
        return result


_MODEL_INPUTS = ("input_ids", "labels", "attention_mask", "position_ids")


@torch.no_grad()
def evaluate_loss(model: CausalLM, examples: Sequence[dict], pad_id: int, batch_size: int = 8) -> float:
    """Mean token loss over `examples` (the loss definition the trainer uses)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        b = collate(list(examples[i : i + batch_size]), pad_id)
        b = {k: v.to(model.device) for k, v in b.items() if k in _MODEL_INPUTS}
        n = count_targets(b["labels"], b["position_ids"])
        if n:
            total += float(model(**b, num_items_in_batch=1).loss)
            count += n
    model.train(was_training)
    return total / max(count, 1)
