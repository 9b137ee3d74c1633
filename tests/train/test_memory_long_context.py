"""The planner at long context: a tiled MLP keeps its [T x intermediate] values for one tile, the longest sequence
that fits a stated GPU is found over the predictions, and `velotune plan --max_seq_length auto` prints it."""

import argparse
import json
import re
from dataclasses import replace

import pytest

from tests.train.test_memory_planner import HF_8B, LLAMA_8B
from velotune.models.decoder import MLP_AUTO_TILE
from velotune.train.memory import GiB, Setting, estimate, longest_seq_len, usable_bytes

QLORA_OFFLOAD = Setting(quantization="nf4", checkpointing="offload", masked=True)


def test_tiled_mlp_lowers_the_long_context_peak():
    s = replace(QLORA_OFFLOAD, seq_len=131072)
    tiled, untiled = estimate(LLAMA_8B, s).total, estimate(LLAMA_8B, replace(s, mlp_tile_tokens=None)).total
    mlp = 131072 * 2 * 14336 * 2  # gate and up of the fused LoRA MLP, bf16, for one layer recomputed
    assert untiled - tiled > 0.9 * mlp


@pytest.mark.parametrize("capacity", [20 * GiB, 24 * GiB, 80 * GiB])
def test_longest_seq_len_is_the_last_length_that_fits(capacity):
    n = longest_seq_len(LLAMA_8B, QLORA_OFFLOAD, capacity)
    assert n % 1024 == 0 and n > 2 * MLP_AUTO_TILE
    assert estimate(LLAMA_8B, replace(QLORA_OFFLOAD, seq_len=n)).total <= usable_bytes(capacity)
    assert estimate(LLAMA_8B, replace(QLORA_OFFLOAD, seq_len=n + 1024)).total > usable_bytes(capacity)


def test_longest_seq_len_finds_lengths_below_the_tiling_switch():
    """Untiled (mlp_tile_tokens None) on a small card, and nothing at all on a tiny one."""
    untiled = replace(QLORA_OFFLOAD, checkpointing="checkpoint", mlp_tile_tokens=None)
    n = longest_seq_len(LLAMA_8B, untiled, 12 * GiB)
    assert 0 < n < 2 * MLP_AUTO_TILE
    assert estimate(LLAMA_8B, replace(untiled, seq_len=n + 1024)).total > usable_bytes(12 * GiB)
    assert longest_seq_len(LLAMA_8B, untiled, 6 * GiB) == 0


def test_plan_max_seq_length_auto_prints_the_longest_length(tmp_path, capsys):
    from velotune.cli import plan

    (tmp_path / "config.json").write_text(json.dumps(HF_8B))
    parser = argparse.ArgumentParser()
    plan.add_parser(parser.add_subparsers())
    flags = ["--load_in_4bit", "true", "--per_device_train_batch_size", "1", "--gradient_checkpointing", "true"]
    argv = ["plan", str(tmp_path), "--gpu", "24GB", "--max_seq_length", "auto", *flags]
    args, extra = parser.parse_known_args(argv)
    assert plan.run(args, extra) == 0
    out = capsys.readouterr().out
    found = re.search(r"24 GB \(22 GiB\): longest max_seq_length that fits: (\d+) tokens", out)
    assert found, out
    n, setting = int(found.group(1)), Setting(quantization="nf4", checkpointing="checkpoint")
    assert estimate(LLAMA_8B, replace(setting, seq_len=n)).total <= usable_bytes(24_000_000_000)
    assert estimate(LLAMA_8B, replace(setting, seq_len=n + 1024)).total > usable_bytes(24_000_000_000)
    longer = re.search(r"with --gradient_checkpointing offload: (\d+) tokens", out)
    assert longer and int(longer.group(1)) > int(found.group(1))
