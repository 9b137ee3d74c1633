"""Training on 2 processes (torchrun, gloo, CPU) gives the 1-process run's losses and LoRA weights, with DDP and
FSDP2, uneven row lengths and a short last step; checkpoints move between 1 and 2 processes. Fast tests cover the
layout errors, the split of a step and the 1-process path against Trainer.accumulate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.distributed import worker
from velotune.errors import ConfigError
from velotune.train import distributed as vd

WORKER = Path(worker.__file__)
TOL = 1e-5


# ---- fast: no process group -------------------------------------------------------------------------------------


def test_fsdp_on_one_process_is_refused():
    with pytest.raises(ConfigError, match="strategy fsdp .* 1 process"):
        vd.init_distributed("cpu", "fsdp", env={})


def test_more_processes_than_gpus_is_refused():
    with pytest.raises(ConfigError, match="4 processes asked for, but this host has 2 CUDA GPU"):
        vd.check_layout(4, "ddp", "cuda", gpus=2)
    vd.check_layout(4, "ddp", "cpu", gpus=0)  # CPU processes need no GPU


def test_unknown_strategy_is_refused():
    with pytest.raises(ConfigError, match="strategy 'zero3' is unknown"):
        vd.check_layout(2, "zero3", "cpu", gpus=0)


def test_without_torchrun_env_one_process_and_no_group():
    env = vd.init_distributed("cpu", "ddp", env={})
    assert (env.rank, env.world_size, env.distributed) == (0, 1, False)
    assert not torch.distributed.is_initialized()


def test_launch_command_only_outside_torchrun():
    cmd = vd.launch_command(2, ["train", "cfg.yaml"], env={})
    assert cmd[1:] == [
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "velotune.cli.main",
        "train",
        "cfg.yaml",
    ]
    assert vd.launch_command(1, ["train"], env={}) is None
    assert vd.launch_command(2, ["train"], env={"RANK": "0", "WORLD_SIZE": "2"}) is None


@pytest.mark.parametrize("n", [1, 5, 8, 13])
def test_step_split_covers_every_row_once_with_equal_micro_batch_counts(n):
    rows = list(range(n))
    parts = [vd.micro_batches(rows, 2, world_size=3, rank=r) for r in range(3)]
    assert len({len(p) for p in parts}) == 1  # same number of forwards/backwards on every rank
    assert sorted(x for p in parts for mb in p for x in mb) == rows


def test_rank0_only_runs_once_on_one_process():
    calls = []
    assert vd.rank0_only(calls.append, 1) is None and calls == [1]


def test_full_optimizer_state_roundtrip_on_one_process():
    model = worker.tiny_model()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    worker.trainer(model, worker.examples(4), vd.Parallel(model, vd.DistEnv())).accumulate([worker.examples(4)])
    opt.step()
    sd = vd.full_optimizer_state(opt)
    fresh = torch.optim.AdamW(params, lr=1e-2)
    vd.load_full_optimizer_state(fresh, sd)
    for i, s in sd["state"].items():
        torch.testing.assert_close(fresh.state_dict()["state"][i]["exp_avg"], s["exp_avg"])
    with pytest.raises(ConfigError, match="missing"):
        vd.load_full_trainable_state(model, {})


# ---- slow: torchrun with 2 processes ----------------------------------------------------------------------------


def _run(out: Path, nproc: int = 1, strategy: str | None = None, *extra: str) -> dict:
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd = [*launch, str(WORKER), "--out", str(out), *(["--strategy", strategy] if strategy else []), *extra]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return torch.load(out, weights_only=True)


def _assert_same_run(got: dict, ref: dict) -> None:
    assert got["losses"], "no steps ran"
    for step, loss in got["losses"].items():
        assert abs(loss - ref["losses"][step]) < TOL, (step, loss, ref["losses"][step])
        assert abs(got["grad_norms"][step] - ref["grad_norms"][step]) < TOL
    assert got["weights"].keys() == ref["weights"].keys()
    for name, w in got["weights"].items():
        torch.testing.assert_close(w, ref["weights"][name], rtol=0, atol=TOL, msg=name)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The 1-process reference: 4 steps, checkpoint after step 2."""
    d = tmp_path_factory.mktemp("single")
    ref = _run(d / "out.pt", 1, None, "--save-at", "2", "--save", str(d / "ckpt.pt"))
    return ref, d / "ckpt.pt"


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_and_their_checkpoint_resumes_on_one(strategy, single, tmp_path):
    ref, _ = single
    two = _run(tmp_path / "two.pt", 2, strategy, "--save-at", "2", "--save", str(tmp_path / "ckpt.pt"))
    _assert_same_run(two, ref)
    resumed = _run(tmp_path / "resumed.pt", 1, None, "--resume", str(tmp_path / "ckpt.pt"))
    assert sorted(resumed["losses"]) == [3, 4]
    _assert_same_run(resumed, ref)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_process_checkpoint_resumes_on_two(strategy, single, tmp_path):
    ref, ckpt = single
    resumed = _run(tmp_path / "resumed.pt", 2, strategy, "--resume", str(ckpt))
    assert sorted(resumed["losses"]) == [3, 4]
    _assert_same_run(resumed, ref)


def test_dpo_on_two_processes_equals_one(tmp_path):
    """DPO through the same accumulation step: 2 gloo processes (DDP) give the 1-process losses and weights; the
    reference pass (the adapter's starting weights swapped in) runs on every rank."""
    one = _run(tmp_path / "one.pt", 1, None, "--method", "dpo", "--steps", "3")
    two = _run(tmp_path / "two.pt", 2, "ddp", "--method", "dpo", "--steps", "3")
    assert all(abs(loss - 0.6931) > 1e-3 for loss in list(one["losses"].values())[1:])  # the policy moved
    _assert_same_run(two, one)


def test_strategy_auto_picks_ddp_when_a_whole_model_fits_each_gpu_else_fsdp():
    gib = 2**30
    assert vd.choose_strategy(20 * gib, 70 * gib)[0] == "ddp"
    strategy, why = vd.choose_strategy(150 * gib, 70 * gib)
    assert strategy == "fsdp" and "planned peak 150.0 GiB, 70.0 usable" in why
    assert vd.choose_strategy(None, None) == ("ddp", "no GPU memory limit to plan against")  # CPU runs


def test_generation_under_fsdp_keeps_the_processes_in_step(tmp_path):
    script = Path(__file__).with_name("generate_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    proc = subprocess.run([*cmd, str(tmp_path)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert rank0 == rank1 and rank0  # rank 0's sampled tokens on both
