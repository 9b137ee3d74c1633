"""DataConfig: every bad value is rejected at creation, naming the key and what it accepts."""

import pytest

from velotune.data import DataConfig
from velotune.errors import ConfigError


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"format": "jsonl"}, r"data\.format is 'jsonl'; expected one of: auto, alpaca, sharegpt"),
        ({"train_on": "assistant"}, r"data\.train_on is 'assistant'; expected one of: responses, all"),
        ({"too_long": "cut"}, r"data\.too_long is 'cut'; expected one of: truncate, drop, fail"),
        ({"template": "llama3.1"}, r"data\.template is 'llama3\.1'; expected one of: .*chatml.*llama-3"),
        ({"eval_split": 1.0}, r"data\.eval_split is 1\.0; expected a fraction in \[0, 1\)"),
        ({"eval_split": -0.1}, r"data\.eval_split"),
        ({"max_seq_length": 0}, r"data\.max_seq_length is 0"),
        ({"max_seq_length": 512.0}, r"data\.max_seq_length is 512\.0"),
        ({"packing": "yes"}, r"data\.packing is 'yes'"),
        ({"seed": "1"}, r"data\.seed"),
        ({"path": ""}, r"data\.path is ''"),
        ({"field_map": {"q": "query"}}, r"maps 'q' to 'query', which no format reads; map to one of: .*instruction"),
        ({"field_map": ["q"]}, r"data\.field_map is list"),
        ({"eval_split": 0.1, "eval_path": "e.jsonl"}, r"use one: eval_path .* or eval_split"),
    ],
)
def test_invalid_data_config_names_key_and_choices(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        DataConfig(**kwargs)


def test_valid_data_config_keeps_values(tmp_path):
    cfg = DataConfig(path=tmp_path / "d.jsonl", format="reasoning", template="qwen", field_map={"Q": "question"})
    assert cfg.path == str(tmp_path / "d.jsonl")
    assert (cfg.format, cfg.template, cfg.field_map) == ("reasoning", "qwen", {"Q": "question"})
