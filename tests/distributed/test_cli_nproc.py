"""`velotune train --nproc 2` (torchrun, gloo, CPU) logs the losses of the 1-process run with the same global batch,
and bad process layouts are refused before any model is loaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from velotune.train import config, distributed

EVAL_DATA = Path(config.__file__).resolve().parents[1] / "datasets" / "iso_dates_eval.jsonl"
TOL = 1e-5


def _train(model: Path, out: Path, *extra: str, timeout: int = 300, faults: str = "") -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "velotune", "train", "--model", str(model), "--dataset", str(EVAL_DATA)]
    cmd += ["--compare_samples", "0", "--output_dir", str(out), "--device", "cpu", "--no_progress", *extra]
    env = os.environ | {"OMP_NUM_THREADS": "1", "VELOTUNE_FAULTS": faults}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _two_like_one(model: Path, tmp_path: Path, *extra: str, two_only: tuple[str, ...] = ()) -> str:
    """Train 3 steps on 2 processes (micro-batch 2, plus `two_only`) into tmp_path/two and on 1 process (micro-batch
    4: the same global batch) into tmp_path/one; assert both succeed with equal losses; the 2-process stdout."""
    args = ["--max_steps", "3", *extra]
    two = _train(model, tmp_path / "two", *args, "--per_device_train_batch_size", "2", "--nproc", "2", *two_only)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = _train(model, tmp_path / "one", *args, "--per_device_train_batch_size", "4", "--nproc", "1")
    assert one.returncode == 0, one.stdout[-3000:] + one.stderr[-3000:]
    got, ref = _losses(tmp_path / "two"), _losses(tmp_path / "one")
    assert sorted(got) == sorted(ref) == [1, 2, 3]
    for step, loss in got.items():
        assert abs(loss - ref[step]) < TOL, (step, loss, ref[step])
    return two.stdout


def _assert_same_tensors(tmp_path: Path, part: str) -> None:
    """The file `part` of tmp_path/two holds the tensors of tmp_path/one's."""
    from safetensors.torch import load_file

    got, ref = (load_file(str(tmp_path / run / part)) for run in ("two", "one"))
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-5, msg=f"{part}: {name}")


def test_config_strategies_are_distributed_ones():
    assert config.STRATEGIES == distributed.STRATEGIES


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--strategy", "fsdp"], "strategy fsdp shards the model over processes, but this run has 1 process"),
        (["--strategy", "zero3"], "strategy: 'zero3' is not valid; choose one of: auto, ddp, fsdp"),
        (["--nproc", "0"], "--nproc must be at least 1, got 0"),
        (
            ["--fsdp_offload_params", "true"],
            "fsdp_offload_params keeps FSDP's shards in host memory, but strategy is auto",
        ),
    ],
)
def test_bad_layouts_are_refused(tmp_path, extra, message):
    proc = _train(tmp_path / "no-model", tmp_path / "run", "--max_steps", "1", *extra, timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert message in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before the run directory (or a model) was made


@pytest.mark.parametrize("strategy", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp", "fsdp_offload"])
def test_two_processes_log_the_one_process_losses_and_save_its_outputs(tiny_model_dir, tmp_path, strategy):
    offload = ["--fsdp_offload_params", "true"] if strategy == "fsdp_offload" else []
    # checkpointing: the recomputation's inner backward under DDP hooks / FSDP sharding
    two_only = ("--strategy", strategy.removesuffix("_offload"), *offload, "--gradient_checkpointing", "true")
    out = _two_like_one(tiny_model_dir, tmp_path, "--save_merged", "true", two_only=two_only)
    if strategy == "fsdp_offload":
        assert "in host memory (fsdp_offload_params)" in out
    assert out.count("trained 3 steps") == 1  # rank 0 alone reports
    assert (tmp_path / "two" / "summary.json").exists()
    # rank 0 writes whole tensors (gathered from the shards under FSDP): the adapter and merged model of one process
    for part in ("adapter/adapter_model.safetensors", "merged/model.safetensors"):
        _assert_same_tensors(tmp_path, part)


def test_fsdp_shards_4bit_weights_and_trains_like_one_process(tiny_model_dir, tmp_path):
    """QLoRA under FSDP2: the NF4 weights are sharded (each of 2 processes holds about half of all weights, the
    issue's bar is 60%), the losses and adapter are the 1-process run's, and save_merged says how to merge."""
    import re

    quant = ["--load_in_4bit", "true", "--dtype", "float32", "--save_merged", "true"]
    out = _two_like_one(tiny_model_dir, tmp_path, *quant, two_only=("--strategy", "fsdp"))
    share = re.search(r"FSDP2 over 2 processes: each holds .* \((\d+)%\), .* quantized ones \((\d+)%\)", out)
    assert share and int(share.group(1)) <= 60 and int(share.group(2)) <= 55, out[-2000:]
    _assert_same_tensors(tmp_path, "adapter/adapter_model.safetensors")
    assert "velotune export" in out and not (tmp_path / "two" / "merged").exists()


def test_a_failing_rank_stops_the_run_with_its_name_and_the_resume_command(tiny_model_dir, tmp_path):
    steps = ["--max_steps", "4", "--save_steps", "1", "--per_device_train_batch_size", "2", "--nproc", "2"]
    failed = _train(tiny_model_dir, tmp_path / "run", *steps, faults="crash@2:1")
    assert failed.returncode != 0
    assert "velotune: rank 1 of 2 failed: RuntimeError: injected failure of rank 1 after step 2" in failed.stderr
    assert "velotune: training on 2 processes failed" in failed.stderr
    assert "resume from checkpoint-2 with:" in failed.stderr and "--resume" in failed.stderr.splitlines()[-1]
    resumed = _train(tiny_model_dir, tmp_path / "run", *steps, "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert sorted(_losses(tmp_path / "run")) == [1, 2, 3, 4]


def test_fsdp_full_finetuning_checkpoints_in_shards_that_resume_and_load_on_one_process(tiny_model_dir, tmp_path):
    """Full fine-tuning under FSDP2 writes torch.distributed.checkpoint shards (no process holds the whole state);
    the run resumes from them with the uninterrupted run's losses, and one process reads them back whole."""
    from safetensors.torch import load_file

    from velotune.models.load import load_model
    from velotune.train.distributed import load_sharded_state

    common = ["--finetuning", "full", "--learning_rate", "1e-3", "--save_steps", "2", "--save_total_limit", "0"]
    two = ["--per_device_train_batch_size", "2", "--nproc", "2", "--strategy", "fsdp", "--dtype", "float32"]
    full = _train(tiny_model_dir, tmp_path / "full", "--max_steps", "4", *common, *two)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    ckpt = tmp_path / "full" / "checkpoint-2"
    assert (ckpt / "sharded" / ".metadata").exists() and not (ckpt / "trainable.safetensors").exists()
    resumed = _train(tiny_model_dir, tmp_path / "resumed", "--max_steps", "4", *common, *two, "--resume", str(ckpt))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    ref, got = _losses(tmp_path / "full"), _losses(tmp_path / "resumed")
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert abs(got[step] - ref[step]) < 1e-5, (step, got[step], ref[step])
    # one process, no process group: the step-4 shards are the weights of the merged model the run wrote
    model, _ = load_model(tiny_model_dir, with_tokenizer=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    load_sharded_state(model, optimizer, tmp_path / "full" / "checkpoint-4" / "sharded")
    merged = load_file(str(tmp_path / "full" / "merged" / "model.safetensors"))
    ours = model.state_dict()
    for name, value in merged.items():
        torch.testing.assert_close(ours[name].float(), value.float(), rtol=1e-2, atol=1e-3, msg=name)
    assert all(optimizer.state[p]["exp_avg"].abs().sum() > 0 for p in model.parameters())
