"""DPO through `velotune train --method dpo` on a tiny model: the run logs TRL's reward metrics, scores the held-out
pairs before and after, and a process killed mid-run (SIGKILL) resumes with --resume to the loss curve of the run
that was never interrupted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.test_resume import _assert_same_curve, _in_process, _kill_when, _logged, _losses

MONTHS = ["January", "March", "May", "July", "September", "November"]


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    rows = []
    for i in range(24):
        month, day, year = MONTHS[i % 6], 3 + i, 2000 + i
        m = 1 + 2 * (i % 6)
        rows.append(
            {
                "prompt": f"Write {month} {day}, {year} as an ISO date.",
                "chosen": f"{year}-{m:02d}-{day:02d}",
                "rejected": f"It is {month} {day}, {year}.",
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _args(model_dir: Path, data: Path, out: Path, steps: int = 12) -> list[str]:
    return [
        "train",
        "--method",
        "dpo",
        "--beta",
        "0.5",
        "--model",
        str(model_dir),
        "--dataset",
        str(data),
        "--eval_dataset",
        str(data),
        "--max_steps",
        str(steps),
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "2",
        "--save_steps",
        "4",
        "--learning_rate",
        "1e-2",
        "--no_progress",
        "--output_dir",
        str(out),
    ]


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, pairs_file, tmp_path_factory) -> tuple[Path, dict[int, float]]:
    out = tmp_path_factory.mktemp("dpo_uninterrupted")
    assert _in_process(_args(tiny_model_dir, pairs_file, out)) == 0
    return out, _losses(out)


def test_dpo_run_logs_reward_metrics_and_scores_pairs_before_and_after(uninterrupted):
    run, losses = uninterrupted
    assert sorted(losses) == list(range(1, 13))
    assert abs(losses[1] - 0.6931) < 1e-3  # a fresh adapter is the reference: log(2) at the first step
    assert losses[12] < losses[1]
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    step_rows = [r for r in rows if "loss" in r]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert all(key in r for r in step_rows), key
    assert step_rows[-1]["rewards/margins"] > 0
    summary = json.loads((run / "summary.json").read_text())
    before, after = summary["preference_before"], summary["preference_after"]
    assert after["eval_rewards/margins"] > before["eval_rewards/margins"] == 0.0
    assert (run / "adapter" / "adapter_config.json").exists()


def test_sigkill_mid_dpo_resumes_with_the_same_loss_curve(tiny_model_dir, pairs_file, tmp_path, uninterrupted):
    _, reference = uninterrupted
    run = tmp_path / "run"
    args = _args(tiny_model_dir, pairs_file, run)
    _kill_when(args, "stall@6:120", _logged(run, 6), tmp_path / "killed.log")
    assert max(_losses(run)) == 6
    assert _in_process(args + ["--resume"]) == 0
    _assert_same_curve(_losses(run), reference)


def test_fit_trains_dpo_through_the_python_api(tiny_model_dir, pairs_file):
    from velotune import fit, get_peft_model, load_model

    model, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    model = get_peft_model(model, r=4, lora_alpha=8)
    result = fit(
        model,
        tokenizer,
        pairs_file,
        method="dpo",
        beta=0.5,
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        gradient_checkpointing=False,
    )
    assert abs(result.losses[0] - 0.6931) < 1e-3 and result.losses[-1] < result.losses[0]


def test_precomputed_reference_gives_the_same_run(tiny_model_dir, pairs_file, tmp_path, uninterrupted):
    """precompute_ref_log_probs: one reference pass before training, none per step; the losses are those of the run
    that computed the reference at every step (up to float rounding of other batch shapes)."""
    _, reference = uninterrupted
    run = tmp_path / "run"
    args = _args(tiny_model_dir, pairs_file, run, steps=4) + ["--precompute_ref_log_probs", "true"]
    assert _in_process(args) == 0
    losses = _losses(run)
    assert sorted(losses) == [1, 2, 3, 4]
    # steps 1 and 2 ran at the same learning rate in both runs (the 4-step schedule decays faster afterwards)
    assert abs(losses[1] - reference[1]) < 1e-4 and abs(losses[2] - reference[2]) < 1e-4
