"""Small token-id datasets and the collator a user would hand to transformers.Trainer."""

from __future__ import annotations

import torch


def uneven_rows(n: int = 8, vocab: int = 1000, seed: int = 0) -> list[dict]:
    """Rows of very different lengths and prompt (masked) parts: input_ids and labels, -100 on the prompt."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 3), (19, 5), (11, 2), (26, 20), (5, 1), (30, 4), (13, 12), (9, 0)]
    rows = []
    for length, prompt in shapes[:n]:
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def pad_collate(features: list[dict], pad_id: int = 2) -> dict[str, torch.Tensor]:
    """Right-pads input_ids (pad_id), labels (-100) and builds attention_mask: what a user's collator gives Trainer."""
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id)
    labels = torch.full((len(features), width), -100)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for i, f in enumerate(features):
        n = len(f["input_ids"])
        ids[i, :n] = torch.tensor(f["input_ids"])
        labels[i, :n] = torch.tensor(f["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
