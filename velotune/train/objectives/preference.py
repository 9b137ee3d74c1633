"""Preference objectives on pairs (prompt, chosen, rejected): DPO (sigmoid / hinge / IPO), ORPO and SimPO.

Written here rather than taken from TRL because they are the product: they run on velotune's decoder, whose
chunked head returns per-sequence log-probs without materialising [tokens x vocab] logits, and in velotune's one
loop (accumulation, OOM halving, exact resume, DDP/FSDP2). The formulas follow the papers and TRL's DPOConfig /
ORPOConfig names (beta, loss_type, label_smoothing); tests compare them with TRL's trainers on the same weights.

A batch of B pairs is one forward of 2B rows: the B chosen sequences, then the B rejected ones, prompt tokens
carrying no label. DPO's reference log-probs come, in order of preference, from values precomputed before training
(precompute_ref_log_probs), from the same weights with LoRA switched off (a fresh adapter: B = 0, so this is the
starting model exactly), or from the trained parameters' starting values swapped in for the reference pass (an
adapter trained further from an SFT run, or full / partial fine-tuning: a copy of only what trains).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from velotune.data import collate
from velotune.errors import ConfigError
from velotune.models.decoder import count_targets
from velotune.train.objectives.base import Objective
from velotune.train.objectives.reference import ReferencePolicy
from velotune.train.objectives.sft import MODEL_INPUTS

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo")


def pair_rows(examples: Sequence[dict]) -> list[dict]:
    """The 2B training rows of B pairs: prompt + chosen for each pair, then prompt + rejected."""
    rows = []
    for side in ("chosen_ids", "rejected_ids"):
        for e in examples:
            prompt, completion = list(e["prompt_ids"]), list(e[side])
            rows.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion})
    return rows


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


class PreferenceObjective(Objective):
    """Shared by DPO, ORPO and SimPO: pair collation and the policy's per-sequence log-probs."""

    metric_unit = "pairs"
    inputs = (*MODEL_INPUTS, "ref_logps")

    def __init__(self, beta: float = 0.1, label_smoothing: float = 0.0) -> None:
        if beta <= 0:
            raise ConfigError(f"beta must be positive, got {beta}")
        if not 0 <= label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.beta, self.label_smoothing = beta, label_smoothing

    def length(self, example: dict) -> int:
        return len(example["prompt_ids"]) + max(len(example["chosen_ids"]), len(example["rejected_ids"]))

    def collate(
        self, examples: list[dict], pad_id: int, packing: bool = False, max_seq_length: int | None = None
    ) -> dict[str, torch.Tensor]:
        batch = collate(pair_rows(examples), pad_id)  # packing does not apply: each row is scored whole
        if all("ref_chosen_logps" in e for e in examples):
            refs = [e["ref_chosen_logps"] for e in examples] + [e["ref_rejected_logps"] for e in examples]
            batch["ref_logps"] = torch.tensor(refs, dtype=torch.float32)
        return batch

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        return {"pairs": batch["input_ids"].shape[0] // 2}

    @staticmethod
    def policy_logps(module: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed log-probs of each row's completion [2B], completion tokens per row [2B])."""
        inputs = {k: batch[k] for k in MODEL_INPUTS}
        out = module(**inputs, return_logps=True)
        return out.logps, out.num_targets_per_row

    def _pair_metrics(
        self, chosen: torch.Tensor, rejected: torch.Tensor, logps: torch.Tensor, summed: torch.Tensor
    ) -> dict[str, float]:
        """Sums over the pairs: rewards (chosen, rejected, margins, accuracies), the policy's log-probs as TRL logs
        them (`logps`: summed for DPO, length-averaged for ORPO / SimPO) and whether the policy alone prefers the
        chosen answer (`summed` log-probs)."""
        chosen, rejected, logps = chosen.detach(), rejected.detach(), logps.detach()
        pc, pr = logps.chunk(2)
        sc, sr = summed.detach().chunk(2)
        return {
            "rewards/chosen": float(chosen.sum()),
            "rewards/rejected": float(rejected.sum()),
            "rewards/margins": float((chosen - rejected).sum()),
            "rewards/accuracies": float((chosen > rejected).float().sum()),
            "logps/chosen": float(pc.sum()),
            "preference_accuracy": float((sc > sr).float().sum()),
            "logps/rejected": float(pr.sum()),
        }


class DPO(PreferenceObjective):
    """Direct Preference Optimization (Rafailov et al. 2023) with TRL's loss types sigmoid, hinge (SLiC) and ipo
    (length-normalised, as TRL). label_smoothing with sigmoid is the conservative cDPO of the paper's note and of
    earlier TRL releases; TRL 1.16 ignores label_smoothing for sigmoid."""

    name = "dpo"

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> None:
        super().__init__(beta, label_smoothing)
        if loss_type not in DPO_LOSS_TYPES:
            raise ConfigError(f"loss_type {loss_type!r} is not one of {', '.join(DPO_LOSS_TYPES)}")
        self.loss_type = loss_type
        self.reference = ReferencePolicy()

    def setup(self, model: nn.Module) -> None:
        """Choose the reference (objectives/reference.py) from the model as training starts."""
        super().setup(model)
        self.reference.capture(model)

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"]
        with self.reference.weights():
            return self.policy_logps(self.model, batch)[0]

    @torch.no_grad()
    def precompute(self, examples: Sequence[dict], pad_id: int, batch_size: int) -> list[dict]:
        """The examples with their reference log-probs attached (precompute_ref_log_probs: one pass before training,
        after which no reference forward runs)."""
        was_training = self.model.training
        self.model.eval()
        out = []
        for i in range(0, len(examples), batch_size):
            part = [dict(e) for e in examples[i : i + batch_size]]
            for e in part:
                e.pop("ref_chosen_logps", None), e.pop("ref_rejected_logps", None)
            b = {k: v.to(self.model.device) for k, v in self.collate(part, pad_id).items()}
            chosen, rejected = self.reference_logps(b).float().cpu().chunk(2)
            for e, c, r in zip(part, chosen.tolist(), rejected.tolist(), strict=True):
                e["ref_chosen_logps"], e["ref_rejected_logps"] = c, r
            out += part
        self.model.train(was_training)
        return out

    def loss(
        self, module: nn.Module, batch: dict[str, torch.Tensor], totals: dict[str, int]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        ref = self.reference_logps(batch)  # first: a swapped-in reference must not touch tensors saved for backward
        logps, n = self.policy_logps(module, batch)  # [2B], [2B]
        ref = ref.to(logps.dtype)
        chosen_ratio, rejected_ratio = (logps - ref).chunk(2)  # log pi/pi_ref for chosen, rejected [B]
        if self.loss_type == "ipo":
            nc, nr = n.clamp(min=1).to(logps.dtype).chunk(2)
            per_pair = (chosen_ratio / nc - rejected_ratio / nr - 1 / (2 * self.beta)) ** 2
        else:
            z = self.beta * (chosen_ratio - rejected_ratio)
            if self.loss_type == "hinge":
                per_pair = torch.relu(1 - z)
            else:
                eps = self.label_smoothing
                per_pair = -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps
        metrics = self._pair_metrics(self.beta * chosen_ratio, self.beta * rejected_ratio, logps, logps)
        return per_pair.sum() / totals["pairs"], metrics


class ORPO(PreferenceObjective):
    """Odds Ratio Preference Optimization (Hong et al. 2024), reference-free: the chosen completions' NLL (mean over
    their tokens) minus beta (the paper's lambda) times the mean log-sigmoid of the log odds ratio of the
    length-averaged log-probs. The NLL covers the completion only (the paper's disable_prompt_loss); TRL's
    ORPOTrainer also counts the prompt tokens."""

    name = "orpo"

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        b = batch["input_ids"].shape[0] // 2
        chosen_tokens = count_targets(batch["labels"][:b], batch["position_ids"][:b])
        return {"pairs": b, "chosen_tokens": chosen_tokens}

    def loss(
        self, module: nn.Module, batch: dict[str, torch.Tensor], totals: dict[str, int]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logps, n = self.policy_logps(module, batch)
        avg = logps.float() / n.clamp(min=1)
        chosen, rejected = avg.chunk(2)
        log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)
        nll = -logps.chunk(2)[0].sum() / totals["chosen_tokens"]
        loss = nll - self.beta * ratio.sum() / totals["pairs"]
        metrics = self._pair_metrics(self.beta * chosen, self.beta * rejected, avg, logps)
        metrics["log_odds_ratio"] = float(ratio.detach().sum())
        metrics["nll_loss"] = float(nll.detach()) * totals["pairs"]  # a sum over pairs, like the others
        return loss, metrics


class SimPO(PreferenceObjective):
    """SimPO (Meng et al. 2024), reference-free: -log sigmoid(beta * (avg logp chosen - avg logp rejected) - gamma),
    with label smoothing as in TRL's CPO trainer."""

    name = "simpo"

    def __init__(self, beta: float = 2.0, label_smoothing: float = 0.0, simpo_gamma: float = 0.5) -> None:
        super().__init__(beta, label_smoothing)
        self.gamma = simpo_gamma

    def loss(
        self, module: nn.Module, batch: dict[str, torch.Tensor], totals: dict[str, int]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        logps, n = self.policy_logps(module, batch)
        avg = logps.float() / n.clamp(min=1)
        chosen, rejected = avg.chunk(2)
        z = self.beta * (chosen - rejected) - self.gamma
        eps = self.label_smoothing
        per_pair = -F.logsigmoid(z) * (1 - eps) - F.logsigmoid(-z) * eps
        metrics = self._pair_metrics(self.beta * chosen, self.beta * rejected, avg, logps)
        return per_pair.sum() / totals["pairs"], metrics
