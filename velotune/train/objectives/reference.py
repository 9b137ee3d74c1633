"""The reference policy of DPO and GRPO without a second model in memory: LoRA switched off for a fresh adapter
(B = 0, so the adapters-off model is the starting model exactly); otherwise the trainable parameters' starting
values, kept as a copy of only what trains and swapped in for reference passes (an adapter continued from an SFT
run, full or partial fine-tuning)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from velotune.lora.apply import disable_adapters, lora_layers


class ReferencePolicy:
    """Call `capture(model)` before the first update; inside `weights()` the model is the reference model."""

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self._snapshot: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def capture(self, model: nn.Module) -> None:
        self.model = model
        layers = lora_layers(model).values()
        fresh_lora = bool(layers) and all(not bool(layer.lora_B.detach().any()) for layer in layers)
        if not fresh_lora:
            params = [p for p in model.parameters() if p.requires_grad]
            self._snapshot = [(p, p.detach().clone()) for p in params]

    @contextlib.contextmanager
    def weights(self) -> Iterator[None]:
        assert self.model is not None, "ReferencePolicy.capture(model) first"
        if self._snapshot is None:
            with disable_adapters(self.model):
                yield
            return
        current = [p.detach().clone() for p, _ in self._snapshot]
        with torch.no_grad():
            for p, start in self._snapshot:
                p.copy_(start)
        try:
            yield
        finally:
            with torch.no_grad():
                for (p, _), now in zip(self._snapshot, current, strict=True):
                    p.copy_(now)
