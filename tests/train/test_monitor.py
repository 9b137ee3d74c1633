"""The training monitor names the setting to change and a value for it; early stopping ends a run whose eval loss
stops improving, keeping the best checkpoint."""

import json

from tests.train.helpers import examples, lora_model
from velotune.train import loop
from velotune.train.config import TrainConfig
from velotune.train.loop import Trainer
from velotune.train.monitor import COOLDOWN, WINDOW, TrainingMonitor


def _monitor(**kw) -> TrainingMonitor:
    return TrainingMonitor(**({"learning_rate": 3e-4, "accumulation": 2, "warmup": 0, "max_grad_norm": 1.0} | kw))


def test_gradient_explosion_suggests_a_lower_learning_rate():
    m = _monitor()
    notices = m.observe(1, 2.0, 37.5)
    assert [n.kind for n in notices] == ["grad_norm"]
    assert "37.5" in notices[0].message and "learning_rate from 3.0e-04 to 1.0e-04" in notices[0].message
    assert m.observe(2, 2.0, 40.0) == []  # not repeated within the cooldown
    assert [n.kind for n in m.observe(2 + COOLDOWN, 2.0, 40.0)] == ["grad_norm"]


def test_gradient_explosion_without_clipping_suggests_max_grad_norm():
    assert "max_grad_norm: 1.0" in _monitor(max_grad_norm=0.0).observe(1, 2.0, 50.0)[0].message


def test_oscillating_loss_suggests_lower_lr_or_more_accumulation():
    m = _monitor()
    kinds = [n for s in range(1, WINDOW + 1) for n in m.observe(s, 2.0 if s % 2 else 3.0, 1.0)]
    assert [n.kind for n in kinds] == ["oscillation"]
    assert "learning_rate from 3.0e-04 to 1.5e-04" in kinds[0].message
    assert "gradient_accumulation_steps from 2 to 4" in kinds[0].message


def test_a_converged_loss_wobbling_near_zero_is_no_oscillation():
    # the demo's curve (30 steps, learning_rate 1e-3, warmup 5): from ~1.2 down to a few hundredths, where each
    # step's loss moves by a third of its level up and down; harmless, so no advice to lower the learning rate
    m = _monitor(warmup=5, learning_rate=1e-3)
    losses = [1.2 * 0.8**s * (1.35 if s % 2 else 0.7) + 0.02 * (1.3 if s % 2 else 0.7) for s in range(40)]
    notices = [n for s, loss in enumerate(losses, 1) for n in m.observe(s, loss, 0.8)]
    assert notices == []


def test_a_noisy_but_falling_loss_is_no_oscillation():
    # the DPO demo's curve (steps 6-25 of a real run: 8 pairs per step, learning_rate 5e-4): up and down on most
    # steps, but the second half of the window is far below the first
    losses = [0.3936, 0.2947, 0.3217, 0.3948, 0.1772, 0.1794, 0.1, 0.1598, 0.1039, 0.3042,
              0.0689, 0.0136, 0.1647, 0.1699, 0.1067, 0.0322, 0.1339, 0.0849, 0.0681, 0.1188]  # fmt: skip
    m = _monitor(warmup=5, learning_rate=5e-4)
    m.state.first = [0.5306]  # the run's first loss after warmup (step 4)
    notices = [n for s, loss in enumerate(losses, 6) for n in m.observe(s, loss, 0.5)]
    assert notices == []


def test_flat_loss_suggests_a_higher_learning_rate():
    m = _monitor(warmup=5)
    notices = [n for s in range(1, 5 + 2 * WINDOW + 1) for n in m.observe(s, 2.0 + 0.001 * (s % 3), 0.5)]
    assert [n.kind for n in notices] == ["plateau"]
    assert "raise learning_rate from 3.0e-04 to 9.0e-04" in notices[0].message


def test_falling_loss_raises_nothing():
    m = _monitor()
    assert [n for s in range(1, 3 * WINDOW) for n in m.observe(s, 3.0 * 0.97**s, 0.8)] == []


def test_rising_eval_loss_warns_and_patience_stops():
    m = _monitor(patience=2)
    assert m.observe_eval(10, 2.0) == ([], False)
    notices, stop = m.observe_eval(20, 2.1)
    assert not stop and notices[0].kind == "eval_rising" and "max_steps: 10" in notices[0].message
    notices, stop = m.observe_eval(30, 2.2)
    assert stop and notices[0].kind == "early_stop" and "best 2.0000 at step 10" in notices[0].message


def test_rising_eval_loss_without_patience_suggests_early_stopping():
    m = _monitor()
    m.observe_eval(10, 2.0)
    assert "early_stopping_patience: 3" in m.observe_eval(20, 2.5)[0][0].message


def test_monitor_state_round_trips():
    m = _monitor()
    for s in range(1, 8):
        m.observe(s, 1.0 / s, 0.5)
    m.observe_eval(7, 1.5)
    again = _monitor()
    again.load_state_dict(json.loads(json.dumps(m.state_dict())))
    assert again.state == m.state


def test_early_stopping_ends_training_and_records_notices(tiny_hf_llama, tmp_path, monkeypatch):
    cfg = TrainConfig(
        max_steps=20, per_device_train_batch_size=2, learning_rate=1e-2, eval_steps=2, early_stopping_patience=2
    )
    trainer = Trainer(lora_model(tiny_hf_llama), examples(12), cfg, 0, tmp_path, progress=False, log=lambda s: None)
    trainer.eval_examples = examples(4, seed=1)
    losses = iter([2.0, 1.5, 1.6, 1.7, 1.8])
    monkeypatch.setattr(loop, "evaluate_loss", lambda *args: next(losses))
    result = trainer.train()
    assert result.stopped_early and result.steps == 8
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["warning"] for r in rows if "warning" in r] == ["eval_rising", "early_stop"]
    assert (tmp_path / "checkpoint-8").is_dir()  # stopping writes a checkpoint


def test_eval_rows_hold_loss_and_perplexity(tiny_hf_llama, tmp_path):
    cfg = TrainConfig(max_steps=4, per_device_train_batch_size=2, eval_steps=2, save_steps=0)
    trainer = Trainer(lora_model(tiny_hf_llama), examples(8), cfg, 0, tmp_path, progress=False)
    trainer.eval_examples = examples(4, seed=1)
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(abs(r["eval_ppl"] - 2.718281828 ** r["eval_loss"]) < 1e-6 * r["eval_ppl"] for r in evals)
