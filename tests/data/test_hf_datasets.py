"""Hugging Face datasets: save_to_disk directories read like files, splits chosen by name, clear errors otherwise."""

import sys

import pytest

from velotune.data import DataConfig, build_datasets
from velotune.errors import ConfigError, DataError

ROWS = [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(4)]


@pytest.fixture
def datasets():
    return pytest.importorskip("datasets")


def test_saved_dataset_directory_is_read_with_rows_named_by_split(tokenizer, tmp_path, datasets, targets):
    path = str(tmp_path / "saved")
    datasets.Dataset.from_list(ROWS).save_to_disk(path)
    train, _ = build_datasets(DataConfig(path=path), tokenizer)
    assert [e["row"] for e in train] == [f"{path}[train]:row {i}" for i in range(1, 5)]
    assert targets(train[2]["input_ids"], train[2]["labels"]) == ["Answer 2.<|im_end|>"]
    assert build_datasets(DataConfig(path=path), tokenizer)[0].stats.cache_hit


def test_dataset_dict_split_is_chosen_and_eval_takes_validation(tokenizer, tmp_path, datasets):
    path = str(tmp_path / "dict")
    splits = {"train": ROWS[:3], "validation": ROWS[3:], "extra": ROWS[:1]}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(path)
    train, eval_set = build_datasets(DataConfig(path=path, eval_path=path), tokenizer)
    assert (len(train), len(eval_set)) == (3, 1)
    assert eval_set[0]["row"] == f"{path}[validation]:row 1"
    extra, _ = build_datasets(DataConfig(path=path, split="extra"), tokenizer)
    assert len(extra) == 1
    with pytest.raises(
        ConfigError, match=r"no split test; the dataset has: train, validation, extra; set dataset_split "
    ):
        build_datasets(DataConfig(path=path, split="test"), tokenizer)


def test_hub_name_offline_is_a_clear_error(tokenizer, datasets, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hugging Face Hub (offline mode is enabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"nobody/nothing: no such local file, and loading it as a Hugging Face hub"):
        build_datasets(DataConfig(path="nobody/nothing"), tokenizer)


def test_without_datasets_installed_the_error_says_what_to_install(tokenizer, tmp_path, monkeypatch):
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "dataset_info.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"saved: reading a saved Hugging Face dataset needs the `datasets` package"):
        build_datasets(DataConfig(path=str(tmp_path / "saved")), tokenizer)
    with pytest.raises(DataError, match=r"org/name: reading a Hugging Face hub dataset needs .*pip install datasets"):
        build_datasets(DataConfig(path="org/name"), tokenizer)


def test_split_on_a_local_file_is_a_config_error(tokenizer, write_jsonl):
    path = write_jsonl(ROWS)
    with pytest.raises(ConfigError, match=r"dataset_split is 'test', but .* is a file"):
        build_datasets(DataConfig(path=path, split="test"), tokenizer)


def test_plain_directory_is_refused(tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"is a directory; give one data file .* save_to_disk"):
        build_datasets(DataConfig(path=str(tmp_path)), tokenizer)
