"""Small token-id datasets and the collator a user would hand to transformers.Trainer."""

from __future__ import annotations

import torch

from velotune.train.config import TrainConfig

# Hyperparameters that make transformers.Trainer and TRL's SFTTrainer step like velotune's loop in the tests that
# compare them: one optimizer step of 2 x 4 rows, cosine schedule without warm-up or decay, a loss logged per step.
TRAINER_ARGS = dict(
    per_device_train_batch_size=2,
    gradient_accumulation_steps=4,
    max_steps=3,
    learning_rate=1e-2,
    lr_scheduler_type="cosine",
    warmup_steps=0,
    weight_decay=0.0,
    optim="adamw_torch",
    logging_steps=1,
    save_strategy="no",
    disable_tqdm=True,
    seed=3407,
)


def velotune_config(**overrides) -> TrainConfig:
    """velotune's TrainConfig with TRAINER_ARGS' batch, steps and schedule (velotune has no warm-up or decay by
    default)."""
    shared = (
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "max_steps",
        "learning_rate",
        "lr_scheduler_type",
        "optim",
    )
    return TrainConfig(**{k: TRAINER_ARGS[k] for k in shared}, **overrides)


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
