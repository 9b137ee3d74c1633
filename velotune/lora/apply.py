"""Attach LoRA (or DoRA) to a model's linear layers, freeze the rest, and merge the result back into plain
weights."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from velotune.errors import ConfigError
from velotune.lora.layers import LoRALinear
from velotune.models.decoder import ALL_PROJECTIONS
from velotune.models.frozen import FrozenQuantLinear
from velotune.quant.apply import dequantize_model
from velotune.quant.fp8 import LinearFP8

log = logging.getLogger("velotune.lora")


@dataclass
class LoRAConfig:
    """PEFT's names: r, lora_alpha, lora_dropout, target_modules, use_rslora, use_dora, bias."""

    r: int = 16
    lora_alpha: float = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(ALL_PROJECTIONS))
    use_rslora: bool = False
    use_dora: bool = False
    bias: str = "none"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            self.target_modules = (
                list(ALL_PROJECTIONS) if self.target_modules == "all-linear" else [self.target_modules]
            )
        if self.r <= 0:
            raise ConfigError(f"lora_r must be a positive integer, got {self.r}")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.bias != "none":
            raise ConfigError(f"bias={self.bias!r} is not supported; velotune trains LoRA with bias='none'")


def _is_linear(module: nn.Module) -> bool:
    return hasattr(module, "in_features") and hasattr(module, "out_features") and not isinstance(module, LoRALinear)


def get_peft_model(model: nn.Module, config: LoRAConfig | None = None, **kwargs: object) -> nn.Module:
    """Freeze every parameter of `model` and wrap the target linear layers with trainable LoRA or DoRA (in
    place)."""
    cfg = config or LoRAConfig(**kwargs)  # type: ignore[arg-type]
    for p in model.parameters():
        p.requires_grad_(False)
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if _is_linear(mod) and name.rsplit(".", 1)[-1] in cfg.target_modules
    ]
    if not targets:
        available = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
        raise ConfigError(
            f"lora target_modules {cfg.target_modules} match no layer; linear layers are: {', '.join(available)}"
        )
    for name, mod in targets:
        parent, _, leaf = name.rpartition(".")
        layer = LoRALinear(mod, cfg.r, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora, cfg.use_dora)
        setattr(model.get_submodule(parent), leaf, layer)
    model.lora_config = cfg
    return model


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block, every LoRA layer of `model` computes its frozen base alone: the model before fine-tuning,
    from the same weights (no second copy). DPO's reference log-probs and before/after answers use it."""
    layers = list(lora_layers(model).values())
    previous = [layer.active for layer in layers]
    for layer in layers:
        layer.active = False
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous, strict=True):
            layer.active = was


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by an nn.Linear holding its merged weight (in place), in the base dtype: W + B @ A *
    scaling, for DoRA times m / ||W + B @ A * scaling|| per row. FP8 bases merge from their dequantized weights, and
    FP8 layers without an adapter are dequantized too, so the result is a 16-bit model (logged)."""
    fp8 = [n for n, m in model.named_modules() if isinstance(m, LinearFP8)]
    if fp8:
        log.info(
            "merging LoRA into the dequantized FP8 base weights: %d FP8 layers become 16-bit (the merged model is "
            "the FP8 base plus the adapter, not the original 16-bit checkpoint)",
            len(fp8),
        )
    for name, layer in lora_layers(model).items():
        base = layer.base_layer
        weight = layer.merged_weight()  # [out, in] fp32
        dtype = base.compute_dtype if isinstance(base, FrozenQuantLinear) else base.weight.dtype
        merged = nn.Linear(
            layer.in_features, layer.out_features, bias=base.bias is not None, device=weight.device, dtype=dtype
        )
        merged.weight.copy_(weight)
        if base.bias is not None:
            merged.bias.copy_(base.bias)
        merged.requires_grad_(False)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, merged)
    if fp8:
        dequantize_model(model, kinds=(LinearFP8,))  # FP8 layers without an adapter
        model.quantization = None
    model.lora_config = None
    return model
