"""A tiny LoRA model and random examples with row names, for trainer tests that need no tokenizer."""

from __future__ import annotations

import torch

from tests.helpers import velotune_from_hf
from velotune.lora.apply import get_peft_model


def examples(n: int = 16, seed: int = 0) -> list[dict]:
    """n examples of 6-20 random tokens (vocab 128), the first 2-5 masked, named data.jsonl:<line>."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(6, 21, (1,), generator=g))
        prompt = int(torch.randint(2, 6, (1,), generator=g))
        ids = torch.randint(3, 128, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "row": f"data.jsonl:{i + 1}"})
    return out


def lora_model(hf_model, r: int = 4, dropout: float = 0.0):
    model = get_peft_model(velotune_from_hf(hf_model), r=r, lora_alpha=2 * r, lora_dropout=dropout)
    model.train()
    return model
