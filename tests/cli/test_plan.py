"""`velotune plan --gpu`: card names as people write them, and a bad name reported before anything is printed."""

import pytest

from velotune.cli.main import main
from velotune.cli.plan import resolve_gpu
from velotune.errors import ConfigError
from velotune.train.memory import GiB


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("RTX3090", "RTX3090"),
        ("RTX 3090", "RTX3090"),
        ("3090", "RTX3090"),
        ("NVIDIA GeForce RTX 4090", "RTX4090"),
        ("rtx-4090", "RTX4090"),
        ("4090", "RTX4090"),
        ("A100-40GB", "A100-40GB"),
        ("a100 80gb", "A100-80GB"),
        ("A100-80G", "A100-80GB"),
        ("A100", "A100-40GB"),  # the smaller one: what fits it fits both
        ("H100", "H100"),
        ("h100-80gb", "H100"),
        ("t4", "T4"),
        ("Tesla T4", "T4"),
        ("L4", "L4"),
        ("A10G", "A10G"),
        ("a10g", "A10G"),
        ("V100", "V100-16GB"),
        ("v100_32gb", "V100-32GB"),
    ],
)
def test_common_card_names_are_accepted(text, name):
    found, capacity = resolve_gpu(text)
    assert found == name and 14 * GiB < capacity < 150 * GiB


def test_memory_sizes_are_accepted():
    assert resolve_gpu("24GB") == ("24 GB", 24_000_000_000)


def test_unknown_card_lists_the_names(capsys):
    with pytest.raises(ConfigError, match=r"--gpu 'RTX2080': .*24GB.*T4.*RTX3090.*A100-80GB.*A100, V100"):
        resolve_gpu("RTX2080")


def test_bad_gpu_is_reported_before_the_table(capsys):
    assert main(["plan", "--gpu", "RTX2080"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("velotune: error: --gpu 'RTX2080'") and len(err.splitlines()) == 1
