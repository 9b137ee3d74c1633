"""GRPO (Shao et al. 2024, the DeepSeek-R1 recipe): each step samples a group of completions per prompt with the
generation engine, scores them with reward functions, and trains on the clipped policy-gradient loss of their
group-normalised advantages, optionally with a KL penalty to the reference policy.

Written here rather than taken from TRL because it is the product: generation (models/generate.py) and training
share one copy of the weights with the adapters active, every log-prob comes from the chunked head (no [tokens x
vocab] logits), the reference is the adapters-off model (objectives/reference.py), and the step runs in the one
loop (accumulation, OOM halving, non-finite skips, checkpoints and exact resume). Names, formulas and metrics follow
TRL's GRPOConfig / GRPOTrainer; tests compare the loss with TRL's `_compute_loss` on the same inputs.

Per token t of completion i, with ratio r = exp(logp - logp_old) (logp_old = logp detached unless num_iterations > 1)
and advantage A_i: loss = -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A) + beta * (exp(ref - logp) - (ref -
logp) - 1). Normalised over the step (all micro-batches and ranks): grpo averages each completion's tokens, then the
completions; bnpo and dapo divide the token sum by the step's completion tokens (the same here: the step is one
batch whatever its split); dr_grpo by completions x max_completion_length.

Sampling is seeded by (seed, generation index), so a resumed run generates what the uninterrupted one did; with
num_iterations > 1 the generation batch reused by later steps travels in the checkpoint.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from velotune.data import collate
from velotune.errors import ConfigError
from velotune.kernels.cross_entropy import IGNORE_INDEX
from velotune.models.decoder import shifted_targets
from velotune.train.objectives.base import Objective
from velotune.train.objectives.reference import ReferencePolicy
from velotune.train.objectives.sft import MODEL_INPUTS

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALE_REWARDS = ("group", "batch", "none")


def group_advantages(rewards: torch.Tensor, group: int, scale: str = "group") -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [N], whether each row's std was zero [N]) for rewards [N] in consecutive groups of `group`:
    reward minus its group's mean, divided by the group's (or batch's) std + 1e-4 unless scale is "none". NaN rewards
    (every reward function returned None) are left out of the statistics and get advantage 0, as in TRL."""
    grouped = rewards.view(-1, group)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group)
    if scale == "batch":
        std = _nanstd(rewards).expand_as(rewards)
    else:
        std = _nanstd(grouped, dim=1).repeat_interleave(group)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + 1e-4)
    return torch.nan_to_num(adv, nan=0.0), torch.isclose(std, torch.zeros_like(std))


def _nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Unbiased std ignoring NaNs (torch.std's default correction)."""
    mean = torch.nanmean(x, dim=dim, keepdim=dim is not None)
    n = (~torch.isnan(x)).sum(dim=dim) if dim is not None else (~torch.isnan(x)).sum()
    var = torch.nansum((x - mean) ** 2, dim=dim) / (n - 1).clamp(min=1)
    return var.sqrt()


def token_losses(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    ref_logps: torch.Tensor | None,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token GRPO loss [B, T] (before masking) and per-token stats: kl, clipped low / high."""
    adv = advantages[:, None]
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * adv, clipped * adv)
    stats = {
        "low": ((ratio < 1 - epsilon_low) & (adv < 0)).float(),
        "high": ((ratio > 1 + epsilon_high) & (adv > 0)).float(),
    }
    if beta != 0.0:
        assert ref_logps is not None
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
        stats["kl"] = kl.detach()
    return loss, stats


class GRPO(Objective):
    """Group Relative Policy Optimization on a prompt dataset (data/prompts.py) with reward functions
    (train/rewards.py)."""

    name = "grpo"
    metric_unit = "completions"
    inputs = (*MODEL_INPUTS, "advantages", "old_logps", "ref_logps")

    def __init__(
        self,
        reward_funcs: Sequence[tuple[str, Any]],
        tokenizer: Any,
        *,
        num_generations: int = 8,
        max_completion_length: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        beta: float = 0.0,
        epsilon: float = 0.2,
        epsilon_high: float | None = None,
        loss_type: str = "dapo",
        scale_rewards: str = "group",
        num_iterations: int = 1,
        mask_truncated_completions: bool = False,
        reward_weights: Sequence[float] | None = None,
        micro_batch_size: int = 8,
        seed: int = 42,
        log_completions_steps: int = 10,
        num_completions_to_print: int = 2,
    ) -> None:
        if loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type {loss_type!r} is not one of {', '.join(LOSS_TYPES)} for grpo")
        if scale_rewards not in SCALE_REWARDS:
            raise ConfigError(f"scale_rewards {scale_rewards!r} is not one of {', '.join(SCALE_REWARDS)}")
        if num_generations < 2:
            raise ConfigError(f"num_generations is {num_generations}; GRPO needs groups of at least 2 completions")
        if not reward_funcs:
            raise ConfigError("grpo needs at least one reward function (reward_funcs)")
        self.funcs = list(reward_funcs)
        weights = [1.0] * len(self.funcs) if reward_weights is None else [float(w) for w in reward_weights]
        if len(weights) != len(self.funcs):
            raise ConfigError(f"reward_weights has {len(weights)} values for {len(self.funcs)} reward functions")
        self.weights = torch.tensor(weights, dtype=torch.float32)
        self.tokenizer = tokenizer
        self.rows_per_example = num_generations
        self.iterations = num_iterations
        self.max_completion_length = max_completion_length
        self.sampling = dict(temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p)
        self.sampling["repetition_penalty"] = repetition_penalty
        self.temperature = temperature
        self.beta, self.loss_type, self.scale_rewards = beta, loss_type, scale_rewards
        self.epsilon_low = epsilon
        self.epsilon_high = epsilon if epsilon_high is None else epsilon_high
        self.mask_truncated = mask_truncated_completions
        self.micro_batch_size, self.seed = micro_batch_size, seed
        self.log_every, self.to_print = log_completions_steps, num_completions_to_print
        self.reference = ReferencePolicy()
        self._buffer: dict[str, Any] | None = None  # the generation batch of the current window of num_iterations
        self._info: dict[str, Any] = {}
        self._prepared_at = 0.0

    # ---- the seam ---------------------------------------------------------------------------------------------

    def setup(self, model: nn.Module) -> None:
        super().setup(model)
        if self.temperature != 1.0 and getattr(model.config, "final_logit_softcap", None) is not None:
            raise ConfigError(
                f"temperature {self.temperature} on a model with a final logit soft-cap (Gemma 2): the loss cannot "
                "score completions at that temperature yet; use temperature: 1.0"
            )
        if self.beta != 0.0:
            self.reference.capture(model)

    def length(self, example: dict) -> int:
        return len(example.get("input_ids") or example["prompt_ids"]) + (
            0 if "input_ids" in example else self.max_completion_length
        )

    def prepare_step(self, examples: list[dict], step: int) -> list[dict]:
        """Generate num_generations completions per prompt, score them and return the rows to train on (the same
        rows for the num_iterations steps of one generation)."""
        index = (step - 1) // self.iterations
        if self._buffer is None or self._buffer["index"] != index:
            started = time.perf_counter()
            rows, info = self._generate_and_score(examples, index)
            info["time/generation_s"] = time.perf_counter() - started
            self._buffer = {"index": index, "rows": rows, "info": info}
        self._info = dict(self._buffer["info"])
        if self.log_every and self.to_print and step % self.log_every == 0:
            self._info["samples"] = self._samples(self._buffer["rows"])
        self._prepared_at = time.perf_counter()
        return self._buffer["rows"]

    def step_info(self) -> dict:
        info = {k: v for k, v in self._info.items() if k != "rows"}
        if self._prepared_at:
            info["time/training_s"] = time.perf_counter() - self._prepared_at
        return info

    def state_dict(self) -> dict:
        return {"buffer": self._buffer} if self._buffer is not None and self.iterations > 1 else {}

    def load_state_dict(self, state: dict) -> None:
        self._buffer = state.get("buffer")

    def collate(
        self, examples: list[dict], pad_id: int, packing: bool = False, max_seq_length: int | None = None
    ) -> dict[str, torch.Tensor]:
        batch = collate(examples, pad_id)
        mask = shifted_targets(batch["labels"], batch["position_ids"]) != IGNORE_INDEX  # [B, T-1]
        batch["advantages"] = torch.tensor([e["advantage"] for e in examples], dtype=torch.float32)
        for key in ("old_logps", "ref_logps"):
            if all(key in e for e in examples):
                values = torch.tensor([v for e in examples for v in e[key]], dtype=torch.float32)
                batch[key] = torch.zeros(mask.shape, dtype=torch.float32).masked_scatter(mask, values)
        return batch

    def counts(self, batch: dict[str, torch.Tensor]) -> dict[str, int]:
        mask = shifted_targets(batch["labels"], batch["position_ids"]) != IGNORE_INDEX
        return {"completions": batch["input_ids"].shape[0], "completion_tokens": int(mask.sum())}

    def loss(
        self, module: nn.Module, batch: dict[str, torch.Tensor], totals: dict[str, int]
    ) -> tuple[torch.Tensor, dict[str, float]]:
        inputs = {k: batch[k] for k in MODEL_INPUTS}
        out = module(**inputs, return_logps=True, temperature=self.temperature)
        logps = out.token_logps  # [B, T-1] fp32, 0 where no target
        mask = (shifted_targets(batch["labels"], batch["position_ids"]) != IGNORE_INDEX).float()
        old = batch.get("old_logps", logps.detach())
        per_token, stats = token_losses(
            logps, old, batch["advantages"], batch.get("ref_logps"), self.beta, self.epsilon_low, self.epsilon_high
        )
        per_token = per_token * mask
        if self.loss_type == "grpo":
            loss = (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / totals["completions"]
        elif self.loss_type == "dr_grpo":
            loss = per_token.sum() / (totals["completions"] * self.max_completion_length)
        else:  # bnpo, dapo: the step's completion tokens
            loss = per_token.sum() / max(totals["completion_tokens"], 1)
        # metric sums over completions (the metric unit): token fractions are per-completion shares of the step
        share = totals["completions"] / max(totals["completion_tokens"], 1)
        metrics = {f"clip_ratio/{k}_mean": float((v * mask).sum()) * share for k, v in stats.items() if k != "kl"}
        metrics["clip_ratio/region_mean"] = metrics["clip_ratio/low_mean"] + metrics["clip_ratio/high_mean"]
        if "kl" in stats:
            metrics["kl"] = float((stats["kl"] * mask).sum()) * share
        return loss, metrics

    # ---- generation and rewards -------------------------------------------------------------------------------

    def _generate_and_score(self, examples: list[dict], index: int) -> tuple[list[dict], dict[str, Any]]:
        from velotune.models.generate import SamplingParams, generate_batch, stop_token_ids
        from velotune.train.rewards import completion_text

        model, group = self.model, self.rows_per_example
        params = SamplingParams(
            max_new_tokens=self.max_completion_length,
            eos_token_ids=stop_token_ids(self.tokenizer),
            num_return_sequences=group,
            seed=self.seed * 1_000_003 + index,
            **self.sampling,
        )
        done = generate_batch(model, [e["prompt_ids"] for e in examples], params, tokenizer=self.tokenizer)
        per_row = [e for e in examples for _ in range(group)]  # completion i answers per_row[i]
        per_func = self._score(per_row, done)  # [N, F], NaN where a function returned None
        prompts = [e["prompt"] for e in per_row]
        conversational = bool(prompts) and isinstance(prompts[0], list)
        texts = [c.text or "" for c in done]
        rows_src = [str(e.get("row", "?")) for e in per_row]
        unscorable = torch.isnan(per_func).all(dim=1)
        rewards = (per_func * self.weights[None, :]).nansum(dim=1)
        rewards[unscorable] = float("nan")
        advantages, std_zero = group_advantages(rewards, group, self.scale_rewards)
        truncated = torch.tensor([c.finish_reason == "length" for c in done])

        rows = []
        for i, c in enumerate(done):
            prompt_ids = list(examples[i // group]["prompt_ids"])
            masked = self.mask_truncated and bool(truncated[i])
            labels = [IGNORE_INDEX] * len(prompt_ids) + ([IGNORE_INDEX] * len(c.tokens) if masked else list(c.tokens))
            rows.append(
                {
                    "input_ids": prompt_ids + list(c.tokens),
                    "labels": labels,
                    "advantage": float(advantages[i]),
                    "reward": float(rewards[i]),
                    "row": rows_src[i],
                    "prompt_text": completion_text(prompts[i]) if conversational else prompts[i],
                    "completion_text": texts[i],
                }
            )
        self._attach_logps(rows, old=self.iterations > 1)
        lengths = torch.tensor([float(len(c.tokens)) for c in done])
        info: dict[str, Any] = {
            "reward": _finite_mean(rewards),
            "reward_std": float(_nanstd(rewards)) if len(rewards) > 1 else 0.0,
            "frac_reward_zero_std": float(std_zero.float().mean()),
            "completions/mean_length": float(lengths.mean()),
            "completions/min_length": float(lengths.min()),
            "completions/max_length": float(lengths.max()),
            "completions/clipped_ratio": float(truncated.float().mean()),
        }
        for f, (name, _) in enumerate(self.funcs):
            col = per_func[:, f]
            info[f"rewards/{name}/mean"] = _finite_mean(col)
            info[f"rewards/{name}/std"] = float(_nanstd(col)) if len(col) > 1 else 0.0
        return rows, info

    def _score(self, examples: list[dict], done: list) -> torch.Tensor:
        """Every reward function on completion i of examples[i] (TRL's call: prompts, completions in the prompts'
        form, the other columns, completion_ids): float32 [N, F], NaN where a function returned None."""
        from velotune.train.rewards import score_completions

        prompts = [e["prompt"] for e in examples]
        texts = [c.text or "" for c in done]
        conversational = bool(prompts) and isinstance(prompts[0], list)
        completions: list[Any] = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        names = sorted({k for e in examples for k in e.get("columns", {})})
        columns = {k: [e.get("columns", {}).get(k) for e in examples] for k in names}
        rows = [str(e.get("row", "?")) for e in examples]
        ids = [c.tokens for c in done]
        return score_completions(self.funcs, prompts, completions, columns, ids, rows, self.max_completion_length)

    @torch.no_grad()
    def _attach_logps(self, rows: list[dict], old: bool) -> None:
        """Per-token log-probs of each row's completion under the reference (beta > 0) and, with num_iterations >
        1, under the policy that generated it; computed in micro-batches, stored on the rows."""
        if self.beta == 0.0 and not old:
            return
        was_training = self.model.training
        self.model.eval()
        pad = self.tokenizer.pad_token_id or 0
        try:
            for start in range(0, len(rows), self.micro_batch_size):
                part = rows[start : start + self.micro_batch_size]
                b = {k: v.to(self.model.device) for k, v in collate(part, pad).items()}
                if old:
                    self._store(part, b, "old_logps")
                if self.beta != 0.0:
                    with self.reference.weights():
                        self._store(part, b, "ref_logps")
        finally:
            self.model.train(was_training)

    def _store(self, part: list[dict], batch: dict[str, torch.Tensor], key: str) -> None:
        out = self.model(**batch, return_logps=True, temperature=self.temperature)
        mask = shifted_targets(batch["labels"], batch["position_ids"]) != IGNORE_INDEX
        for r, (row_logps, row_mask) in enumerate(zip(out.token_logps.float().cpu(), mask.cpu(), strict=True)):
            part[r][key] = row_logps[row_mask].tolist()

    def _samples(self, rows: list[dict]) -> list[dict]:
        """The first completions of the step's first prompts: prompt, completion, reward, advantage."""
        picked = rows[:: self.rows_per_example][: self.to_print]
        return [
            {"prompt": r["prompt_text"], "completion": r["completion_text"], "reward": r["reward"]}
            | {"advantage": r["advantage"]}
            for r in picked
        ]

    # ---- evaluation -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, examples: Sequence[dict], pad_id: int, batch_size: int) -> dict[str, float]:
        """Mean reward of one greedy completion per held-out prompt (eval_loss: its negative, for early stopping),
        and the mean of each reward function."""
        from velotune.models.generate import SamplingParams, generate_batch, stop_token_ids

        examples = list(examples)
        params = SamplingParams(max_new_tokens=self.max_completion_length, eos_token_ids=stop_token_ids(self.tokenizer))
        done = []
        for i in range(0, len(examples), batch_size * 4):
            part = examples[i : i + batch_size * 4]
            done += generate_batch(self.model, [e["prompt_ids"] for e in part], params, tokenizer=self.tokenizer)
        per_func = self._score(examples, done)
        rewards = (per_func * self.weights[None, :]).nansum(dim=1)
        reward = _finite_mean(rewards)
        out = {"eval_loss": -reward, "eval_reward": reward}
        for f, (name, _) in enumerate(self.funcs):
            out[f"eval_rewards/{name}/mean"] = _finite_mean(per_func[:, f])
        return out


def _finite_mean(x: torch.Tensor) -> float:
    value = float(torch.nanmean(x)) if len(x) else 0.0
    return value if math.isfinite(value) else 0.0
