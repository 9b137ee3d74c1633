"""Mistakes a user can make end in one clear message and exit status 2, not a traceback."""

import json
import subprocess
import sys

import pytest

from velotune.cli.main import main


def _run(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err


def test_unknown_config_key_suggests_the_right_one(capsys):
    code, err = _run(capsys, "train", "--learning_rat", "1e-4")
    assert code == 2
    assert "unknown key 'learning_rat'" in err and "learning_rate" in err


def test_unknown_key_in_yaml_names_the_file(capsys, tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("lora_rank: 8\n")
    code, err = _run(capsys, "train", str(cfg))
    assert code == 2 and str(cfg) in err and "lora_r" in err


def test_bad_value_names_key_and_type(capsys):
    code, err = _run(capsys, "train", "--learning_rate", "fast")
    assert code == 2 and "learning_rate: expected float" in err


def test_missing_dataset_path(capsys, tmp_path):
    code, err = _run(capsys, "train", "--dataset", str(tmp_path / "nope.jsonl"))
    assert code == 2 and "nope.jsonl" in err and "does not exist" in err


def test_jsonl_line_that_is_not_json_reports_file_and_line(capsys, tmp_path, tiny_model_dir):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + '{"instruction": "a", "output"\n')
    code, err = _run(capsys, "train", "--model", str(tiny_model_dir), "--dataset", str(data), "--no_progress")
    assert code == 2 and f"{data}:2" in err and "JSON" in err


def test_row_missing_fields_names_row_and_fields(capsys, tmp_path, tiny_model_dir):
    data = tmp_path / "data.jsonl"
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "only an instruction"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, err = _run(capsys, "train", "--model", str(tiny_model_dir), "--dataset", str(data), "--no_progress")
    assert code == 2 and f"{data}:2" in err and "output" in err


def test_unsupported_architecture_lists_supported(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba", "vocab_size": 10}))
    code, err = _run(capsys, "generate", str(tmp_path), "--prompt", "hi")
    assert code == 2 and "'mamba' is not supported" in err and "llama" in err


@pytest.mark.parametrize("argv", [["train", "--lora_r", "0"]])
def test_error_exits_without_traceback(argv):
    proc = subprocess.run([sys.executable, "-m", "velotune", *argv], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "lora_r must be a positive integer" in proc.stderr
