"""Fixtures: the tiny Llama checkpoint loaded through FastLanguageModel (4-bit, and with LoRA)."""

from __future__ import annotations

import copy

import pytest
import torch


@pytest.fixture(scope="module")
def loaded_4bit(tiny_model_dir):
    """(model, tokenizer) of the tiny checkpoint in 4-bit, loaded once per module; tests take deep copies."""
    from velotune.compat import FastLanguageModel

    return FastLanguageModel.from_pretrained(str(tiny_model_dir), max_seq_length=128, load_in_4bit=True)


@pytest.fixture
def lora_4bit(loaded_4bit):
    """A fresh copy of the 4-bit tiny model with LoRA r=8 on all projections (B non-zero so adapters matter)."""
    from velotune.compat import FastLanguageModel
    from velotune.lora.apply import lora_layers

    model, tok = copy.deepcopy(loaded_4bit[0]), loaded_4bit[1]
    model = FastLanguageModel.get_peft_model(model, r=8, lora_alpha=16, random_state=0)
    torch.manual_seed(1)
    for layer in lora_layers(model.model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.05)
    return model, tok
