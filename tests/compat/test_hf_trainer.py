"""transformers.Trainer drives velotune's model unchanged: same losses as velotune's own loop, accumulation
normalised by tokens, checkpoints that save and resume, evaluation."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.compat.helpers import TRAINER_ARGS, pad_collate, uneven_rows, velotune_config
from velotune.lora.apply import lora_layers
from velotune.train.loop import Trainer as VelotuneTrainer
from velotune.train.loop import evaluate_loss

transformers = pytest.importorskip("transformers")


def _args(tmp_path, **overrides):
    kw = dict(TRAINER_ARGS, output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True)
    kw.update(overrides)
    return transformers.TrainingArguments(**kw)


def _hf_losses(model, rows, args):
    trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, data_collator=pad_collate)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], trainer


def test_trainer_losses_equal_velotune_loop_on_the_same_batches(lora_4bit, tmp_path):
    """8 rows = one optimizer step (2 x 4 accumulation), so every step sees the same rows in both loops; the
    step loss (token sum over all micro-batches / their target tokens) does not depend on their order."""
    rows = uneven_rows(8)
    ours = copy.deepcopy(lora_4bit[0])
    cfg = velotune_config(max_grad_norm=1.0)
    expected = VelotuneTrainer(ours.model, rows, cfg, pad_id=2, progress=False).train().losses
    got, _ = _hf_losses(copy.deepcopy(lora_4bit[0]), rows, _args(tmp_path))
    assert len(got) == 3
    torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=1e-5, atol=1e-5)
    assert abs(got[2] - got[0]) > 1e-3  # the steps did train: later losses differ from the first


def _first_update(model, rows, tmp_path, batch, accum):
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = _args(
        tmp_path,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accum,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
    )
    transformers.Trainer(model=model, args=args, train_dataset=rows, data_collator=pad_collate).train()
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if p.requires_grad}


def test_trainer_accumulation_4x1_equals_one_batch_of_4(lora_4bit, tmp_path):
    """SGD with lr 1 and no clipping: the update is minus the gradient, so scale errors show up."""
    rows = uneven_rows(4)  # 7, 19, 11 and 26 tokens with 4, 14, 9 and 6 targets
    one_batch = _first_update(copy.deepcopy(lora_4bit[0]), rows, tmp_path, batch=4, accum=1)
    accumulated = _first_update(copy.deepcopy(lora_4bit[0]), rows, tmp_path, batch=1, accum=4)
    for name, delta in one_batch.items():
        torch.testing.assert_close(accumulated[name], delta, rtol=1e-4, atol=1e-7, msg=name)
    naive_model = copy.deepcopy(lora_4bit[0])
    naive_model.accepts_loss_kwargs = False  # Trainer then averages per-micro-batch means: a different update
    naive = _first_update(naive_model, rows, tmp_path, batch=1, accum=4)
    assert max(float((naive[n] - d).abs().max()) for n, d in one_batch.items()) > 1e-4


def test_trainer_checkpoint_saves_and_resumes(lora_4bit, tmp_path):
    rows = uneven_rows(8)
    args = _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=1)
    first, trainer = _hf_losses(copy.deepcopy(lora_4bit[0]), rows, args)
    assert (tmp_path / "out" / "checkpoint-1" / "model.safetensors").is_file()  # the tied head does not break it
    resumed_model = copy.deepcopy(lora_4bit[0])
    for layer in lora_layers(resumed_model.model).values():
        torch.nn.init.zeros_(layer.lora_B)  # resume must restore the trained adapters
    resumed = transformers.Trainer(model=resumed_model, args=args, train_dataset=rows, data_collator=pad_collate)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-1"))
    losses = [h["loss"] for h in resumed.state.log_history if "loss" in h]
    torch.testing.assert_close(losses[-1], first[-1], rtol=1e-5, atol=1e-5)


def test_trainer_evaluate_gives_velotune_eval_loss(lora_4bit, tmp_path):
    rows = uneven_rows(8)
    model = lora_4bit[0]
    trainer = transformers.Trainer(
        model=model,
        args=_args(tmp_path, per_device_eval_batch_size=8, prediction_loss_only=True),
        eval_dataset=rows,
        data_collator=pad_collate,
    )
    got = trainer.evaluate()["eval_loss"]
    assert got == pytest.approx(evaluate_loss(model.model, rows, pad_id=2), rel=1e-5)


def test_num_parameters_of_a_4bit_model_equals_the_checkpoints(loaded_4bit, tiny_model_dir):
    """transformers' num_parameters() on a 4-bit model counts each weight once at its [out, in] size (the Trainer
    and TRL print it; it was counted twice, once by the decoder and once more by the wrapper)."""
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = loaded_4bit[0]
    assert model.num_parameters() == hf.num_parameters()
    embeddings = hf.get_input_embeddings().weight.numel()
    assert model.num_parameters(exclude_embeddings=True) == hf.num_parameters() - embeddings
