"""DoRA twins: a velotune model and PEFT's DoRA on the same weights and the same random adapter values; and the
Triton device fixture of the kernel tests, for the GPU DoRA tests here."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from peft import LoraConfig
from peft import get_peft_model as peft_get_peft_model
from torch import nn

from tests.kernels.conftest import triton_device  # noqa: F401  (a fixture, used by the GPU tests here)
from velotune.lora.apply import ALL_PROJECTIONS, get_peft_model, lora_layers

PEFT_NAMES = {
    "lora_A": "lora_A.default.weight",
    "lora_B": "lora_B.default.weight",
    "lora_magnitude_vector": "lora_magnitude_vector.default.weight",
}
Twin = tuple[nn.Module, nn.Module, list[tuple[str, nn.Parameter, nn.Parameter]]]


def dora_twin(ours: nn.Module, hf_model: nn.Module, seed: int = 5, **lora: object) -> Twin:
    """(ours with velotune's DoRA, hf_model with PEFT's, [(name, our parameter, PEFT's)]): A and B ~ 0.1 N(0, 1),
    m = its start (||W||) times 1 + 0.2 N(0, 1), the same values on both sides. `lora`: r, lora_alpha, lora_dropout."""
    get_peft_model(ours, use_dora=True, **lora)
    theirs = peft_get_peft_model(hf_model, LoraConfig(target_modules=list(ALL_PROJECTIONS), use_dora=True, **lora))
    peft_params = dict(theirs.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    pairs = []
    for name, layer in lora_layers(ours).items():
        for part, peft_name in PEFT_NAMES.items():
            mine, their = getattr(layer, part), peft_params[f"base_model.model.{name}.{peft_name}"]
            noise = torch.randn(mine.shape, generator=gen).to(mine.device)
            value = mine.detach() * (1 + 0.2 * noise) if part == "lora_magnitude_vector" else 0.1 * noise
            mine.data.copy_(value)
            their.data.copy_(value)
            pairs.append((f"{name}.{part}", mine, their))
    return ours, theirs, pairs


@pytest.fixture
def make_dora_twin() -> Callable[..., Twin]:
    return dora_twin
