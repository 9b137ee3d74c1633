"""Optimizers and learning-rate schedules by name (TrainingArguments' `optim` and `lr_scheduler_type`).

adamw_torch and adamw_torch_fused use torch's fused AdamW kernel when every parameter is on CUDA; adamw_8bit is
velotune's blockwise 8-bit AdamW (adamw_8bit.py); adafactor is torch.optim.Adafactor (factored second moments,
no first moment); sgd is plain SGD.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from velotune.errors import ConfigError
from velotune.train.adamw_8bit import AdamW8bit
from velotune.train.config import TrainConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("no parameter is trainable; check finetuning, target_modules and train_layers")
    if cfg.optim == "sgd":
        return torch.optim.SGD(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    if cfg.optim == "adafactor":
        if not hasattr(torch.optim, "Adafactor"):
            raise ConfigError(f"optim: adafactor needs torch >= 2.5 (this is {torch.__version__}); use adamw_8bit")
        return torch.optim.Adafactor(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if cfg.optim == "adamw_8bit":
        return AdamW8bit(params, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)
    fused = all(p.is_cuda and p.is_floating_point() for p in params)
    return torch.optim.AdamW(
        params,
        lr=cfg.learning_rate,
        betas=betas,
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
        fused=fused or None,
    )


def warmup_steps(cfg: TrainConfig, total_steps: int) -> int:
    return cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * total_steps)


def lr_multiplier(cfg: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Linear warmup, then cosine / linear decay to 0 or constant, as a function of the step index."""
    warm = warmup_steps(cfg, total_steps)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, total_steps - warm)
        if cfg.lr_scheduler_type == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if cfg.lr_scheduler_type == "linear":
            return max(0.0, 1.0 - progress)
        return 1.0

    return factor


def build_scheduler(
    opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(cfg, total_steps))
