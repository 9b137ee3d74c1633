"""Supervised fine-tuning: next-token cross-entropy over the target tokens, normalised by the target tokens of the
whole step (so accumulation 4 x batch 1 equals batch 4 x accumulation 1 whatever the sequence lengths)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from velotune.data import collate
from velotune.models.decoder import count_targets
from velotune.train.objectives.base import Objective

MODEL_INPUTS = ("input_ids", "labels", "attention_mask", "position_ids")


class SFT(Objective):
    name = "sft"
    metric_unit = "targets"
    inputs = MODEL_INPUTS

    def length(self, example: dict) -> int:
        return len(example["input_ids"])

    def collate(
        self, examples: list[dict], pad_id: int, packing: bool = False, max_seq_length: int | None = None
    ) -> dict[str, torch.Tensor]:
        return collate(examples, pad_id, packing=packing, max_seq_length=max_seq_length)

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {"targets": count_targets(batch["labels"], batch["position_ids"])}

    def loss(
        self, module: nn.Module, batch: dict[str, torch.Tensor], totals: dict[str, int]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        return module(**batch, num_items_in_batch=totals["targets"]).loss, {}

    def evaluate(self, examples: Sequence[dict], pad_id: int, batch_size: int) -> dict[str, float]:
        from velotune.train.loop import evaluate_loss

        return {"eval_loss": evaluate_loss(self.model, examples, pad_id, batch_size)}
