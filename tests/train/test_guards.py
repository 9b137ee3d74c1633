"""Guards that keep an unattended run going: non-finite steps are skipped and reported (and stop the run with a
diagnosis when they repeat), and an out-of-memory step is retried with half the micro-batch and twice the
accumulation, giving the loss curve of a run that used the smaller micro-batch from the start."""

import copy
import json

import pytest
import torch

from tests.train.helpers import examples, lora_model
from velotune.errors import TrainingError
from velotune.train.config import TrainConfig
from velotune.train.faults import Faults
from velotune.train.loop import Trainer


def _cfg(**kw) -> TrainConfig:
    base = dict(max_steps=6, per_device_train_batch_size=4, learning_rate=1e-2, save_steps=0, warmup_steps=0)
    return TrainConfig(**(base | kw))


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_injected_nonfinite_step_is_skipped_and_reported(tiny_hf_llama, tmp_path):
    model = lora_model(tiny_hf_llama)
    data = examples()
    trainer = Trainer(model, data, _cfg(), pad_id=0, run_dir=tmp_path, progress=False, callbacks=[Faults({3})])
    messages = []
    trainer.log = messages.append
    result = trainer.train()

    assert result.steps == 6 and len(result.losses) == 5
    assert [s["step"] for s in result.skipped] == [3]
    batch_rows = {e["row"] for e in trainer.step_examples(3)}
    assert set(result.skipped[0]["rows"]) == batch_rows and all(r.startswith("data.jsonl:") for r in batch_rows)
    skipped = [r for r in _rows(tmp_path) if "skipped" in r]
    assert skipped == [{"step": 3, "skipped": "non-finite loss", "rows": result.skipped[0]["rows"], "bad_in_a_row": 1}]
    assert any("step 3 skipped: non-finite loss" in m and "data.jsonl:" in m for m in messages)
    for p in model.parameters():
        assert torch.isfinite(p).all()
    # the skipped step left the optimizer alone: 5 updates, not 6
    assert all(s["step"] == 5 for s in trainer.optimizer.state_dict()["state"].values())


def test_skipped_step_leaves_weights_and_optimizer_untouched(tiny_hf_llama):
    model = lora_model(tiny_hf_llama)
    trainer = Trainer(model, examples(), _cfg(), pad_id=0, progress=False, callbacks=[Faults({2})])
    trainer.train_step(trainer.split(trainer.step_examples(1)), 1)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    state = copy.deepcopy(trainer.optimizer.state_dict())
    loss, grad_norm, _ = trainer.train_step(trainer.split(trainer.step_examples(2)), 2)
    assert loss != loss  # NaN
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, weights[n]), n
            assert p.grad is None
    after = trainer.optimizer.state_dict()["state"]
    for k, v in state["state"].items():
        assert torch.equal(after[k]["exp_avg"], v["exp_avg"]) and torch.equal(after[k]["step"], v["step"])


def test_repeated_nonfinite_steps_stop_with_a_diagnosis(tiny_hf_llama, tmp_path):
    model = lora_model(tiny_hf_llama)
    cfg = _cfg(max_bad_steps=3, save_steps=100)
    trainer = Trainer(model, examples(), cfg, pad_id=0, run_dir=tmp_path, progress=False, callbacks=[Faults({2, 3, 4})])
    trainer.log = lambda s: None
    with pytest.raises(TrainingError) as err:
        trainer.train()
    text = str(err.value)
    assert "step 4" in text and "3 steps in a row" in text
    assert "learning_rate 1.0e-02" in text and "try" in text
    assert "data.jsonl:" in text  # the rows of the bad batches
    assert "checkpoint-4" in text and (tmp_path / "checkpoint-4").is_dir()  # resumable past the bad batches


def test_diagnosis_mentions_float16_overflow(tiny_hf_llama):
    model = lora_model(tiny_hf_llama).half()
    trainer = Trainer(model, examples(), _cfg(max_bad_steps=1), pad_id=0, progress=False, callbacks=[Faults({1})])
    trainer.log = lambda s: None
    with pytest.raises(TrainingError, match="float16 overflow"):
        trainer.train()


def test_out_of_memory_halves_micro_batch_and_keeps_the_loss_curve(tiny_hf_llama, tmp_path):
    base = lora_model(tiny_hf_llama)
    for p in base.parameters():  # non-zero LoRA B so every step moves the loss
        if p.requires_grad and p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    data = examples(24)
    messages = []
    big = Trainer(copy.deepcopy(base), data, _cfg(), 0, tmp_path / "oom", progress=False, log=messages.append)
    big.callbacks = [Faults(oom_steps={3})]
    small_cfg = _cfg(per_device_train_batch_size=2, gradient_accumulation_steps=2)
    small = Trainer(copy.deepcopy(base), data, small_cfg, 0, progress=False)
    a, b = big.train(), small.train()

    assert (a.micro_batch_size, a.accumulation) == (2, 2)
    assert a.oom_events == [
        {"step": 3, "event": "out_of_memory", "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}
    ]
    assert any("out of GPU memory at step 3: micro-batch 4 -> 2, gradient accumulation 1 -> 2" in m for m in messages)
    assert [r for r in _rows(tmp_path / "oom") if r.get("event")] == a.oom_events
    torch.testing.assert_close(torch.tensor(a.losses), torch.tensor(b.losses), rtol=1e-5, atol=1e-6)


def test_out_of_memory_at_micro_batch_1_says_what_to_change(tiny_hf_llama):
    trainer = Trainer(lora_model(tiny_hf_llama), examples(), _cfg(per_device_train_batch_size=1), 0, progress=False)
    trainer.callbacks = [Faults(oom_steps={1})]
    with pytest.raises(TrainingError, match="micro-batch 1.*gradient_checkpointing: offload.*velotune plan"):
        trainer.train()


def test_auto_batch_size_does_nothing_on_cpu(tiny_hf_llama):
    trainer = Trainer(lora_model(tiny_hf_llama), examples(), _cfg(), 0, progress=False)
    assert "nothing to do on cpu" in trainer.auto_micro_batch()
    assert trainer.state.micro_batch_size == 4
