"""Mistakes a user can make end in one clear message and exit status 2, not a traceback."""

import json
import subprocess
import sys
import time

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


@pytest.fixture
def no_model_load(monkeypatch, tmp_path):
    """Training that must stop before loading a model (and, run from tmp_path, writes nothing into the checkout)."""

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr("velotune.train.run.load_quantized", load)
    monkeypatch.chdir(tmp_path)


def test_missing_dataset_path(capsys, tmp_path, no_model_load):
    code, err = _run(capsys, "train", "--dataset", str(tmp_path / "nope.jsonl"))
    assert code == 2 and f"{tmp_path / 'nope.jsonl'}: file not found" in err


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "data.jsonl: no rows found; the file is empty"),
        ("\n\n", "data.jsonl: no rows found"),
        ('{"instruction": "a", "output"\n', "data.jsonl:1: not valid JSON"),
        ('{"question": "a", "reply": "b"}\n', "data.jsonl:1: cannot tell the data format from the fields (question, "),
    ],
)
def test_empty_or_malformed_dataset_is_reported_before_the_model_loads(
    capsys, tmp_path, no_model_load, content, expected
):
    (tmp_path / "data.jsonl").write_text(content)
    code, err = _run(capsys, "train", "--dataset", str(tmp_path / "data.jsonl"))
    assert code == 2 and expected in err


def test_eval_dataset_is_checked_too(capsys, tmp_path, no_model_load):
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "p", "completion": "c"}) + "\n")
    (tmp_path / "eval.jsonl").write_text("")
    code, err = _run(
        capsys, "train", "--dataset", str(tmp_path / "train.jsonl"), "--eval_dataset", str(tmp_path / "eval.jsonl")
    )
    assert code == 2 and "eval.jsonl: no rows found" in err


def test_csv_with_unknown_columns_names_the_dataset_format_key(capsys, tmp_path, no_model_load):
    (tmp_path / "data.csv").write_text("question,reply\nq,r\n")
    code, err = _run(capsys, "train", "--dataset", str(tmp_path / "data.csv"))
    assert code == 2 and "data.csv:2: cannot tell the data format" in err
    assert "Set dataset_format: <name>, or rename fields with field_map" in err
    # the advice works: the key exists (rows of an explicit format then need its fields)
    code, err = _run(capsys, "train", "--dataset", str(tmp_path / "data.csv"), "--dataset_format", "alpaca")
    assert code == 2 and 'data.csv:2: missing "instruction", "output"' in err


def test_malformed_dataset_fails_fast_in_one_line(tmp_path):
    """The process exits 2 with one line within seconds of its imports (loading the model took 35-50 s)."""
    data = tmp_path / "data.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\nnot json\n')
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import velotune.cli.main"], check=True, timeout=120)
    imports = time.perf_counter() - start
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "velotune", "train", "--dataset", str(data)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"velotune: error: {data}:2: not valid JSON (Expecting value at column 1)"]
    assert seconds < imports + 10, f"{seconds:.1f} s to report a bad file ({imports:.1f} s of it importing)"
    assert not (tmp_path / "runs").exists()


def test_jsonl_line_that_is_not_json_reports_file_and_line(capsys, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + '{"instruction": "a", "output"\n')
    code, err = _run(capsys, "train", "--model", str(tiny_model_dir), "--dataset", str(data), "--no_progress")
    assert code == 2 and f"{data}:2" in err and "JSON" in err


def test_row_missing_fields_names_row_and_fields(capsys, tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
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
