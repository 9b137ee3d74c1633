"""GRPO through `velotune train --method grpo` on a tiny model with a reward function given by file path: the run
logs TRL's reward metrics and sampled completions, scores the held-out prompts before and after, and a process
killed mid-run (SIGKILL) resumes with --resume to the rewards and losses of the run that was never interrupted --
with num_iterations 2 and the checkpoint inside a generation window, so the reused generation batch must come back
from the checkpoint. Bad input (a reward that raises, num_generations 1, a batch of partial groups, a reward
reading a column the data lacks) ends in one message, exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_resume import ROOT, _in_process, _kill_when, _logged

MONTHS = ["January", "March", "May", "July", "September", "November"]

REWARDS = '''
def length_gap(completions, answer, **kwargs):
    """How close the completion's length is to the answer's (varies across a group of random completions)."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [-abs(len(t) - len(a)) / 10 for t, a in zip(texts, answer)]


def broken(completions, **kwargs):
    raise KeyError("score")
'''


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("grpo_data")
    rows = []
    for i in range(16):
        month, day, year = MONTHS[i % 6], 3 + i, 2000 + i
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"Write {month} {day}, {year} as an ISO date."}],
                "answer": f"{year}-{1 + 2 * (i % 6):02d}-{day:02d}",
            }
        )
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "rewards.py").write_text(REWARDS)
    return root / "prompts.jsonl", root / "rewards.py"


def _args(model_dir: Path, data: tuple[Path, Path], out: Path, steps: int = 6, reward: str = "length_gap") -> list:
    prompts, rewards = data
    return [
        "train",
        "--method",
        "grpo",
        "--model",
        str(model_dir),
        "--dataset",
        str(prompts),
        "--eval_dataset",
        str(prompts),
        "--reward_funcs",
        f"{rewards}:{reward}",
        "--num_generations",
        "2",
        "--per_device_train_batch_size",
        "2",
        "--gradient_accumulation_steps",
        "2",
        "--max_completion_length",
        "6",
        "--num_iterations",
        "2",
        "--beta",
        "0.04",
        "--max_steps",
        str(steps),
        "--save_steps",
        "3",
        "--log_completions_steps",
        "2",
        "--learning_rate",
        "5e-2",
        "--compare_samples",
        "4",
        "--no_progress",
        "--output_dir",
        str(out),
    ]


def _step_rows(run: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("grpo_uninterrupted")
    assert _in_process(_args(tiny_model_dir, data, out)) == 0
    return out


def test_grpo_run_logs_rewards_samples_and_scores_before_and_after(uninterrupted):
    rows = _step_rows(uninterrupted)
    assert sorted(rows) == list(range(1, 7))
    for key in (
        "reward",
        "reward_std",
        "rewards/length_gap/mean",
        "rewards/length_gap/std",
        "completions/mean_length",
        "completions/clipped_ratio",
        "kl",
        "clip_ratio/region_mean",
        "time/generation_s",
        "time/training_s",
    ):
        assert all(key in r for r in rows.values()), key
    # num_iterations 2: steps 2k-1 and 2k train on one generation batch, so they log the same rewards
    assert rows[1]["reward"] == rows[2]["reward"] and rows[3]["reward"] == rows[4]["reward"]
    assert rows[1]["kl"] == 0.0 < rows[2]["kl"]  # the policy starts as the reference, then moves away
    all_rows = [json.loads(x) for x in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    samples = [r for r in all_rows if "samples" in r]
    assert [r["step"] for r in samples] == [2, 4, 6]
    assert {"prompt", "completion", "reward", "advantage"} <= set(samples[0]["samples"][0])
    summary = json.loads((uninterrupted / "summary.json").read_text())
    assert "eval_reward" in summary["preference_before"] and "eval_reward" in summary["preference_after"]


def test_sigkill_inside_a_generation_window_resumes_with_the_same_rewards_and_losses(
    tiny_model_dir, data, tmp_path, uninterrupted
):
    run = tmp_path / "run"
    args = _args(tiny_model_dir, data, run)
    # checkpoint-3 is written inside the window of steps 3-4; killed after step 4 is logged, the resumed run must
    # train step 4 on the generation batch that the checkpoint carries
    _kill_when(args, "stall@4:120", _logged(run, 4), tmp_path / "killed.log")
    assert _in_process(args + ["--resume"]) == 0
    got, want = _step_rows(run), _step_rows(uninterrupted)
    assert sorted(got) == sorted(want)
    for step in want:
        for key in ("loss", "reward", "kl", "completions/mean_length"):
            assert got[step][key] == pytest.approx(want[step][key], abs=1e-6), (step, key)


def _cli(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "velotune", *args], cwd=ROOT, capture_output=True, text=True)


@pytest.mark.parametrize(
    "change, message",
    [
        (["--reward_funcs", "{rewards}:broken"], "reward function 'broken' raised KeyError: 'score' on row"),
        (["--num_generations", "1"], "num_generations is 1; GRPO compares completions within a group"),
        (
            ["--per_device_train_batch_size", "3", "--gradient_accumulation_steps", "1"],
            "3 completions per step is not a whole number of groups of 2 (num_generations)",
        ),
    ],
)
def test_bad_input_is_one_message(tiny_model_dir, data, tmp_path, change, message):
    args = _args(tiny_model_dir, data, tmp_path / "run", steps=1)
    for i in range(0, len(change), 2):
        args[args.index(change[i]) + 1] = change[i + 1].format(rewards=data[1])
    done = _cli(args)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert message in last and "Traceback" not in done.stderr


def test_reward_reading_a_missing_column_is_named_before_training(tiny_model_dir, data, tmp_path):
    lacking = tmp_path / "no_answer.jsonl"
    lacking.write_text(json.dumps({"prompt": "Write May 3, 2001 as an ISO date."}) + "\n")
    args = _args(tiny_model_dir, (lacking, data[1]), tmp_path / "run", steps=1)
    done = _cli(args)
    assert done.returncode == 2
    assert "length_gap reads column 'answer'" in done.stderr and "Traceback" not in done.stderr


def test_fit_trains_grpo_with_a_callable_reward(tiny_model_dir, data):
    from velotune import fit, get_peft_model, load_model

    def short(completions, **kwargs):
        return [-len(c[0]["content"]) / 10 for c in completions]

    model, tokenizer = load_model(str(tiny_model_dir), device="cpu")
    model = get_peft_model(model, r=4, lora_alpha=8)
    result = fit(
        model,
        tokenizer,
        data[0],
        method="grpo",
        reward_funcs=[short],
        num_generations=2,
        per_device_train_batch_size=4,
        max_completion_length=4,
        max_steps=2,
        learning_rate=1e-2,
        gradient_checkpointing=False,
    )
    assert result.steps == 2 and len(result.losses) == 2
