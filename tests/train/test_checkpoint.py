"""Checkpoints: complete or absent, rotated (keeping the best), and resumed to the exact state of the
uninterrupted run (weights, optimizer, schedule, RNG, data position) in-process."""

import random

import numpy as np
import pytest
import torch

from tests.train.helpers import examples, lora_model
from velotune.errors import ConfigError
from velotune.train import loop
from velotune.train.checkpoint import (
    capture_rng,
    config_differences,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng,
    rotate,
)
from velotune.train.config import TrainConfig
from velotune.train.loop import Trainer


def _cfg(**kw) -> TrainConfig:
    base = dict(max_steps=8, per_device_train_batch_size=3, learning_rate=1e-2, save_steps=4, warmup_steps=2)
    return TrainConfig(**(base | kw))


def test_resumed_trainer_matches_the_uninterrupted_one(tiny_hf_llama, tmp_path):
    """Data order spanning an epoch boundary (16 examples, 3 per step), dropout drawing random numbers."""
    data = examples(16)
    torch.manual_seed(1)
    full = Trainer(lora_model(tiny_hf_llama, dropout=0.2), data, _cfg(), 0, tmp_path / "a", progress=False).train()

    torch.manual_seed(1)
    first = Trainer(lora_model(tiny_hf_llama, dropout=0.2), data, _cfg(), 0, tmp_path / "b", progress=False)
    first.total_steps = 5  # stop after step 5 with the schedule of an 8-step run
    first.train()
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["checkpoint-4", "checkpoint-5"]

    torch.manual_seed(99)  # a different start: everything must come from the checkpoint
    second = Trainer(lora_model(tiny_hf_llama, dropout=0.2), data, _cfg(), 0, tmp_path / "b", progress=False)
    resumed = second.train(resume_from=tmp_path / "b" / "checkpoint-4")
    assert resumed.start_step == 4 and resumed.steps == 8
    assert resumed.losses == full.losses  # exact: same ops on the same values


def test_checkpoint_holds_state_rng_and_data_position(tiny_hf_llama, tmp_path):
    trainer = Trainer(lora_model(tiny_hf_llama), examples(10), _cfg(max_steps=4), 0, tmp_path, progress=False)
    trainer.train()
    ckpt = load_checkpoint(tmp_path / "checkpoint-4")
    # 10 examples, 3 per step: 4 steps per epoch, so after step 4 the next step is epoch 1, step 0
    assert (ckpt.state.step, ckpt.state.epoch, ckpt.state.step_in_epoch) == (4, 1, 0)
    assert set(ckpt.weights) == {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert ckpt.optimizer["state"] and ckpt.torch_state["scheduler"]["last_epoch"] == 4
    assert {"python", "numpy"} <= set(ckpt.state.rng) and "torch" in ckpt.torch_state
    assert (tmp_path / "checkpoint-4" / "metrics.jsonl").read_text().count('"loss"') == 4
    assert (tmp_path / "checkpoint-4" / "config.yaml").exists()


def test_rng_states_round_trip():
    plain, tensors = capture_rng()
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng(plain, tensors)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_rotation_keeps_the_last_n_and_the_best(tmp_path):
    for step in (5, 10, 15, 20, 25):
        d = tmp_path / f"checkpoint-{step}"
        d.mkdir()
        (d / "trainer_state.json").write_text("{}")
    deleted = rotate(tmp_path, keep_last=2, best="checkpoint-10")
    assert sorted(p.name for p in deleted) == ["checkpoint-15", "checkpoint-5"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-10", "checkpoint-20", "checkpoint-25"]


def test_best_checkpoint_by_eval_loss_survives_rotation(tiny_hf_llama, tmp_path, monkeypatch):
    cfg = _cfg(max_steps=8, save_steps=2, eval_steps=2, save_total_limit=1)
    trainer = Trainer(lora_model(tiny_hf_llama), examples(12), cfg, 0, tmp_path, progress=False)
    trainer.eval_examples = examples(4, seed=1)
    evals = iter([3.0, 1.0, 2.0, 2.5])  # best at step 4
    monkeypatch.setattr(loop, "evaluate_loss", lambda *args: next(evals))
    result = trainer.train()
    assert result.best_checkpoint == "checkpoint-4"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-8"]


def test_unfinished_checkpoint_directory_is_ignored(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text("{}")
    (tmp_path / ".checkpoint-10.tmp-123").mkdir()  # killed while writing
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-5"]


def test_resume_true_without_checkpoints_says_nothing_to_resume(tmp_path):
    with pytest.raises(ConfigError, match="nothing to resume.*holds no checkpoint.*without --resume"):
        find_checkpoint(True, str(tmp_path))
    with pytest.raises(ConfigError, match="output_dir is not set"):
        find_checkpoint(True, None)


def test_resume_path_that_is_not_a_checkpoint_lists_the_ones_there(tmp_path):
    good = tmp_path / "checkpoint-5"
    good.mkdir()
    for name in ("trainable.safetensors", "optimizer.pt", "trainer_state.pt", "trainer_state.json", "config.yaml"):
        (good / name).write_text("")
    (tmp_path / "checkpoint-7").mkdir()
    with pytest.raises(ConfigError, match=r"checkpoint-7: is not a complete checkpoint \(missing .*checkpoint-5"):
        find_checkpoint(str(tmp_path / "checkpoint-7"), None)
    assert find_checkpoint(str(tmp_path), None) == good  # a run directory: its latest checkpoint


def test_config_differences_ignore_keys_a_resume_may_change():
    saved = {"learning_rate": 1e-3, "lora_r": 16, "logging_steps": 1, "max_steps": 30, "resume": False}
    current = {"learning_rate": 5e-4, "lora_r": 8, "logging_steps": 10, "max_steps": 60, "resume": "x"}
    assert config_differences(saved, current) == ["lora_r: 16 -> 8"]


def test_resume_refuses_a_different_data_order(tiny_hf_llama, tmp_path):
    Trainer(lora_model(tiny_hf_llama), examples(10), _cfg(max_steps=4), 0, tmp_path, progress=False).train()
    other = Trainer(lora_model(tiny_hf_llama), examples(12), _cfg(max_steps=6), 0, tmp_path, progress=False)
    with pytest.raises(ConfigError, match="data order differs"):
        other.train(resume_from=tmp_path / "checkpoint-4")


def test_resume_with_a_lower_learning_rate_keeps_the_schedule_shape(tiny_hf_llama, tmp_path):
    """After a divergence the user resumes with a lower learning_rate: the schedule continues at the new scale."""
    Trainer(lora_model(tiny_hf_llama), examples(12), _cfg(max_steps=8), 0, tmp_path, progress=False).train()
    again = Trainer(lora_model(tiny_hf_llama), examples(12), _cfg(learning_rate=1e-3), 0, tmp_path, progress=False)
    again.restore(tmp_path / "checkpoint-4")
    factor = again.scheduler.lr_lambdas[0](4)
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * factor)
    again.scheduler.step()
    assert again.optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * again.scheduler.lr_lambdas[0](5))


def test_a_key_added_after_the_checkpoint_compares_with_its_default():
    """A checkpoint from before a key existed (use_dora, say) resumes when the run keeps that key's default, and is
    refused when the run changes it."""
    saved, defaults = {"lora_r": 16}, {"lora_r": 8, "use_dora": False}
    assert config_differences(saved, {"lora_r": 16, "use_dora": False}, defaults) == []
    assert config_differences(saved, {"lora_r": 16, "use_dora": True}, defaults) == ["use_dora: False -> True"]
