"""trl.SFTTrainer drives velotune's model unchanged: its losses equal velotune's loop on the same token batches,
and train_on_responses_only works on its collator."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.compat.helpers import TRAINER_ARGS, velotune_config
from velotune.compat import get_chat_template, train_on_responses_only
from velotune.train.loop import Trainer as VelotuneTrainer

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


def _texts(eos: str) -> list[dict]:
    return [
        {"text": f"Question {i}: what is {i} + {i * 3}? Answer: {i + i * 3}." + " ok" * (i % 5) + eos} for i in range(8)
    ]


def _config(tmp_path, **overrides):
    kw = dict(
        TRAINER_ARGS,
        output_dir=str(tmp_path / "sft"),
        dataset_text_field="text",
        max_length=128,
        packing=False,
        report_to="none",
        bf16=False,  # SFTConfig's default bf16 autocast would make TRL's LM-head pass round to bf16 on CPU
    )
    kw.update(overrides)
    return trl.SFTConfig(**kw)


def test_sft_trainer_losses_equal_velotune_loop(lora_4bit, tmp_path):
    model, tok = copy.deepcopy(lora_4bit[0]), lora_4bit[1]
    ours = copy.deepcopy(model)
    trainer = trl.SFTTrainer(
        model=model,
        processing_class=tok,
        train_dataset=datasets.Dataset.from_list(_texts(tok.eos_token)),
        args=_config(tmp_path),
    )
    rows = [{"input_ids": r["input_ids"], "labels": r["input_ids"]} for r in trainer.train_dataset]
    assert len(rows) == 8  # one optimizer step holds every row, so both loops see the same rows every step
    trainer.train()
    got = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    cfg = velotune_config()
    expected = VelotuneTrainer(ours.model, rows, cfg, pad_id=tok.pad_token_id, progress=False).train().losses
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-4, atol=1e-4)


def test_sft_trainer_with_responses_only_trains_on_replies(lora_4bit, tmp_path):
    model, tok = copy.deepcopy(lora_4bit[0]), copy.deepcopy(lora_4bit[1])
    tok = get_chat_template(tok, "chatml")
    chats = [
        {"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"{w}!"}]}
        for w in ("red", "green", "blue", "cyan", "pink", "gold", "grey", "navy")
    ]
    trainer = trl.SFTTrainer(
        model=model,
        processing_class=tok,
        train_dataset=datasets.Dataset.from_list(chats),
        args=_config(tmp_path, dataset_text_field=None, max_steps=1),
    )
    trainer = train_on_responses_only(trainer, "<|im_start|>user\n", "<|im_start|>assistant\n")
    batch = next(iter(trainer.get_train_dataloader()))
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        kept = tok.decode(ids[labels != -100])
        assert kept.endswith("!<|im_end|>\n") and "user" not in kept and len(kept) < 20
    trainer.train()
