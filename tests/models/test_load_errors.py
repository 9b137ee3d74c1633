"""A model directory with a corrupt, truncated or missing file ends in one message naming the file and exit status 2
(no traceback), found from headers and JSON before any weight is read."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_llama_config
from velotune.errors import ModelLoadError
from velotune.models.load import load_model

SHARD = "model-00002-of-00004.safetensors"


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny random Llama saved by transformers twice: one model.safetensors, and 4 shards with an index."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    single, sharded = tmp_path_factory.mktemp("single"), tmp_path_factory.mktemp("sharded")
    model.save_pretrained(single)
    model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / SHARD).exists() and (sharded / "model.safetensors.index.json").exists()
    return {"single": single, "sharded": sharded}


def _corrupt_single(d: Path) -> Path:
    (d / "model.safetensors").write_bytes(b"not a safetensors file at all")  # first 8 bytes: a huge header length
    return d / "model.safetensors"


def _truncate_shard(d: Path) -> Path:
    data = (d / SHARD).read_bytes()
    (d / SHARD).write_bytes(data[: len(data) // 2])
    return d / SHARD


def _remove_shard(d: Path) -> Path:
    (d / SHARD).unlink()
    return d / "model.safetensors.index.json"  # the message names the index and the missing shard


def _index_not_json(d: Path) -> Path:
    (d / "model.safetensors.index.json").write_text('{"weight_map": {')
    return d / "model.safetensors.index.json"


def _config_not_json(d: Path) -> Path:
    (d / "config.json").write_text('{"model_type": "llama",')
    return d / "config.json"


BREAKAGES = {
    "corrupt_model_safetensors": ("single", _corrupt_single, "corrupt or truncated"),
    "truncated_shard": ("sharded", _truncate_shard, "corrupt or truncated"),
    "missing_shard": ("sharded", _remove_shard, SHARD),
    "index_not_json": ("sharded", _index_not_json, "not valid JSON"),
    "config_not_json": ("single", _config_not_json, "not valid JSON"),
}


def _broken(saved: dict[str, Path], tmp_path: Path, case: str) -> tuple[Path, Path, str]:
    layout, breaker, says = BREAKAGES[case]
    d = tmp_path / case
    shutil.copytree(saved[layout], d)
    return d, breaker(d), says


@pytest.mark.parametrize("case", list(BREAKAGES))
def test_broken_model_dir_exits_2_with_one_line_naming_the_file(saved, tmp_path, case):
    d, named, says = _broken(saved, tmp_path, case)
    proc = subprocess.run(
        [sys.executable, "-m", "velotune", "generate", str(d), "--prompt", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("velotune: error:")]
    assert len(lines) == 1 and proc.stderr.strip() == lines[0], proc.stderr
    assert str(named) in lines[0] and says in lines[0]


@pytest.mark.parametrize("case", list(BREAKAGES))
def test_broken_model_dir_fails_before_any_weight_is_read(saved, tmp_path, case, monkeypatch):
    import velotune.models.load as load

    d, named, _ = _broken(saved, tmp_path, case)
    monkeypatch.setattr(load, "iter_safetensors", lambda files: pytest.fail("weights read before the check"))
    with pytest.raises(ModelLoadError, match=str(named).replace("\\", "\\\\")):
        load_model(d, with_tokenizer=False)


@pytest.mark.parametrize(
    "index, says",
    [({"metadata": {}}, "no weight_map"), ([1, 2], "no weight_map"), ({"weight_map": {"a": 3}}, "no weight_map")],
)
def test_index_without_a_weight_map_is_named(saved, tmp_path, index, says):
    d = tmp_path / "m"
    shutil.copytree(saved["sharded"], d)
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=says):
        load_model(d, with_tokenizer=False)


@pytest.mark.parametrize("content", [b"", b"\x89PNG\r\n\x1a\n\x00\x00", b"[1, 2]"])
def test_config_that_is_empty_binary_or_not_an_object_is_named(saved, tmp_path, content):
    d = tmp_path / "m"
    shutil.copytree(saved["single"], d)
    (d / "config.json").write_bytes(content)
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(d, with_tokenizer=False)


@pytest.mark.parametrize("size", [0, 4, 8])
def test_safetensors_too_short_for_a_header_is_named(saved, tmp_path, size):
    d = tmp_path / "m"
    shutil.copytree(saved["single"], d)
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:size])
    with pytest.raises(ModelLoadError, match="model.safetensors: not a readable safetensors file"):
        load_model(d, with_tokenizer=False)


def test_intact_dirs_still_load(saved):
    single, _ = load_model(saved["single"], with_tokenizer=False)
    sharded, _ = load_model(saved["sharded"], with_tokenizer=False)
    for (name, a), (_, b) in zip(single.state_dict().items(), sharded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_rope_tables_follow_the_weights_to_their_device():
    """The rope tables (built on the CPU) go where the weights go, so no forward copies them (a CUDA graph capture
    refuses that copy). The meta device stands in for a GPU."""
    from velotune.models.families import family_for
    from velotune.models.load import build_empty, load_weights

    cfg = family_for("llama").from_hf(
        dict(
            model_type="llama",
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        )
    )
    state = {n: torch.zeros(p.shape) for n, p in build_empty(cfg).named_parameters()}
    model = build_empty(cfg)
    assert model.inv_freq.device.type == "cpu"
    load_weights(model, state.items(), "test", torch.float32, "meta")
    assert model.inv_freq.device.type == "meta"
    assert "inv_freq" not in model.state_dict()  # still not saved with the weights
