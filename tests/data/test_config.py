"""DataConfig: every bad value is rejected at creation, naming the key and what it accepts."""

import pytest

from velotune.data import DataConfig
from velotune.errors import ConfigError


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"format": "jsonl"}, r"dataset_format: 'jsonl' is not valid; choose one of: auto, alpaca, sharegpt"),
        ({"train_on": "assistant"}, r"train_on: 'assistant' is not valid; choose one of: responses, all"),
        ({"too_long": "cut"}, r"too_long: 'cut' is not valid; choose one of: truncate, drop, fail"),
        ({"template": "llama3.1"}, r"chat_template: 'llama3\.1' is not valid; choose one of: .*chatml.*llama-3"),
        ({"eval_split": 1.0}, r"eval_split is 1\.0; expected a fraction in \[0, 1\)"),
        ({"eval_split": -0.1}, r"eval_split"),
        ({"max_seq_length": 0}, r"max_seq_length is 0"),
        ({"max_seq_length": 512.0}, r"max_seq_length is 512\.0"),
        ({"packing": "yes"}, r"packing is 'yes'"),
        ({"seed": "1"}, r"DataConfig\.seed"),
        ({"path": ""}, r"dataset is ''"),
        ({"field_map": {"q": "query"}}, r"maps 'q' to 'query', which no format reads; map to one of: .*instruction"),
        ({"field_map": ["q"]}, r"field_map is list"),
        ({"eval_split": 0.1, "eval_path": "e.jsonl"}, r"use one: eval_dataset .* or eval_split"),
    ],
)
def test_invalid_data_config_names_key_and_choices(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        DataConfig(**kwargs)


def test_valid_data_config_keeps_values(tmp_path):
    cfg = DataConfig(path=tmp_path / "d.jsonl", format="reasoning", template="qwen", field_map={"Q": "question"})
    assert cfg.path == str(tmp_path / "d.jsonl")
    assert (cfg.format, cfg.template, cfg.field_map) == ("reasoning", "qwen", {"Q": "question"})
