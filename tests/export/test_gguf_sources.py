"""GGUF export reading a broken checkpoint: a truncated safetensors file, an index naming a missing shard, an index
that is not JSON: one ModelLoadError naming the file (no traceback from the header parser)."""

from __future__ import annotations

import json
import shutil

import pytest

from velotune.errors import ModelLoadError
from velotune.export.gguf import _safetensors_sources


@pytest.fixture
def checkpoint(tiny_model_dir, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    return out


def test_a_sound_checkpoint_lists_its_tensors(checkpoint):
    assert "model.embed_tokens.weight" in _safetensors_sources(checkpoint)


def test_truncated_file_is_named(checkpoint):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: not a readable safetensors file .*truncated"):
        _safetensors_sources(checkpoint)


def test_index_naming_a_missing_shard_is_named(checkpoint):
    (checkpoint / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(ModelLoadError, match=r"names 1 shard file\(s\) missing .*model-00001-of-00002"):
        _safetensors_sources(checkpoint)


def test_index_that_is_not_json_is_named(checkpoint):
    (checkpoint / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"model\.safetensors\.index\.json: not valid JSON"):
        _safetensors_sources(checkpoint)
