"""Training methods as objectives of the one loop: `velotune train --method sft|dpo|orpo|simpo`."""

from __future__ import annotations

from typing import Any

from velotune.errors import ConfigError
from velotune.train.objectives.base import Objective
from velotune.train.objectives.grpo import GRPO
from velotune.train.objectives.preference import DPO, ORPO, PreferenceObjective, SimPO
from velotune.train.objectives.sft import SFT

METHODS = ("sft", "dpo", "orpo", "simpo", "grpo")


def build_objective(cfg: Any, tokenizer: Any = None, reward_funcs: list | None = None) -> Objective:
    """The objective a TrainConfig names (method, beta, loss_type, label_smoothing, simpo_gamma; for grpo its
    generation and reward keys, the tokenizer that decodes completions, and reward functions given as callables
    rather than the config's names)."""
    method = getattr(cfg, "method", "sft")
    if method == "grpo":
        from velotune.train.rewards import load_reward_funcs

        return GRPO(
            load_reward_funcs(reward_funcs or cfg.reward_funcs),
            tokenizer,
            num_generations=cfg.num_generations,
            max_completion_length=cfg.max_completion_length,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            min_p=cfg.min_p,
            repetition_penalty=cfg.repetition_penalty,
            beta=cfg.beta,
            epsilon=cfg.epsilon,
            epsilon_high=cfg.epsilon_high,
            loss_type=cfg.loss_type,
            scale_rewards=cfg.scale_rewards,
            num_iterations=cfg.num_iterations,
            mask_truncated_completions=cfg.mask_truncated_completions,
            reward_weights=cfg.reward_weights,
            micro_batch_size=cfg.per_device_train_batch_size,
            seed=cfg.seed,
            log_completions_steps=cfg.log_completions_steps,
            num_completions_to_print=cfg.num_completions_to_print,
        )
    if method == "sft":
        return SFT()
    if method == "dpo":
        return DPO(cfg.beta, cfg.loss_type, cfg.label_smoothing)
    if method == "orpo":
        return ORPO(cfg.beta, cfg.label_smoothing)
    if method == "simpo":
        return SimPO(cfg.beta, cfg.label_smoothing, cfg.simpo_gamma)
    raise ConfigError(f"method {method!r} is not one of {', '.join(METHODS)}")


__all__ = ["DPO", "GRPO", "METHODS", "ORPO", "SFT", "Objective", "PreferenceObjective", "SimPO", "build_objective"]
