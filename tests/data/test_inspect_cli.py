"""`velotune data inspect`: format, row accounting, length histogram (text and PNG), masked examples."""

import argparse
import importlib.util
import subprocess
import sys
import time

import numpy as np
import pytest

from velotune.cli import data as data_cmd
from velotune.data.inspection import histogram, histogram_figure, show_example
from velotune.errors import DataError

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="pip install matplotlib")


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="velotune")
    data_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    args, extra = parser.parse_known_args(argv)
    return data_cmd.run(args, extra)


@pytest.fixture
def cli_tokenizer(tokenizer, monkeypatch):
    monkeypatch.setattr(data_cmd, "load_tokenizer", lambda model: tokenizer)
    return tokenizer


def test_inspect_shows_format_counts_histogram_and_masked_examples(cli_tokenizer, write_jsonl, tmp_path, capsys):
    rows = [{"instruction": f"Question {i}?", "output": f"Answer {i}."} for i in range(5)]
    rows.append({"instruction": "word " * 60, "output": "late"})
    rows.append({"instruction": "q", "output": ""})
    path = write_jsonl(rows)
    png = tmp_path / "lengths.png"
    assert run_cli(["data", "inspect", path, "--max_seq_length", "48", "--output", str(png), "--color", "never"]) == 0
    out = capsys.readouterr().out
    assert f"{path}: format alpaca" in out
    assert "read 7 rows" in out and "used 6" in out
    assert f"1 no target tokens after truncation (e.g. {path}:6)" in out
    assert f"rows longer than max_seq_length 48: 1 (14.3%), e.g. {path}:6" in out
    assert "token lengths of 7 rows" in out and "over max_seq_length" in out
    assert f"--- {path}:1 (" in out
    assert "[/masked]Answer 0.<|im_end|>" in out and "[masked]<|im_start|>system" in out
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"histogram written to {png}" in out


def test_inspect_without_matplotlib_says_so(cli_tokenizer, write_jsonl, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = write_jsonl([{"prompt": "p", "completion": "c"}])
    assert run_cli(["data", "inspect", path, "--png", str(tmp_path / "x.png")]) == 0
    out = capsys.readouterr().out
    assert "no PNG histogram: matplotlib is not installed (pip install matplotlib)" in out
    assert not (tmp_path / "x.png").exists()


def test_histogram_bins_cover_every_length():
    table = histogram(np.array([3, 5, 5, 9, 30]), bins=4)
    assert table[0][0] == 3 and table[-1][1] > 30
    assert sum(c for _, _, c in table) == 5


def test_show_example_marks_masked_text(tokenizer):
    ids = tokenizer("Hello there", add_special_tokens=False)["input_ids"]
    example = {"input_ids": ids, "labels": [-100] + ids[1:]}
    assert show_example(example, tokenizer) == "[masked]Hello[/masked] there"
    assert show_example(example, tokenizer, color=True) == "\x1b[2mHello\x1b[0m there"


@pytest.fixture
def no_tokenizer(monkeypatch):
    def load(model):
        raise AssertionError("the tokenizer was loaded before the file was checked")

    monkeypatch.setattr(data_cmd, "load_tokenizer", load)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("missing.jsonl", None, "missing.jsonl: file not found"),
        ("empty.jsonl", "", "empty.jsonl: no rows found"),
        ("bad.jsonl", "{not json\n", "bad.jsonl:1: not valid JSON"),
        (
            "odd.csv",
            "question,reply\nq,r\n",
            "odd.csv:2: cannot tell the data format from the fields (question, reply)",
        ),
    ],
)
def test_inspect_checks_the_file_before_loading_the_tokenizer(no_tokenizer, tmp_path, name, content, expected):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as error:
        run_cli(["data", "inspect", str(path)])
    assert expected in str(error.value) and "data." not in str(error.value).replace(str(tmp_path), "")


def test_inspect_options_carry_the_config_key_names(cli_tokenizer, tmp_path, capsys):
    path = tmp_path / "odd.csv"
    path.write_text("question,reply\nWhat is 2 + 2?,4\n")
    argv = ["data", "inspect", str(path), "--no_png", "--field_map", "{question: instruction, reply: output}"]
    assert run_cli(argv + ["--dataset_format", "alpaca", "--chat_template", "chatml"]) == 0
    assert f"{path}: format alpaca" in capsys.readouterr().out


def test_inspect_of_a_missing_file_exits_fast_in_one_line(tmp_path):
    """Exit 2 with one line naming the file, within seconds of the imports (it used to load the model first)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import velotune.cli.main"], check=True, timeout=120)
    imports = time.perf_counter() - start
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "velotune", "data", "inspect", "nope.jsonl"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        f"velotune: error: nope.jsonl: file not found (working directory: {tmp_path}); check the path"
    ]
    assert seconds < imports + 10, f"{seconds:.1f} s to report a missing file ({imports:.1f} s of it importing)"


@needs_matplotlib
def test_png_goes_next_to_the_data_file_not_into_the_working_directory(
    cli_tokenizer, write_jsonl, tmp_path, monkeypatch, capsys
):
    path = write_jsonl([{"prompt": f"p{i}", "completion": "c"} for i in range(3)], name="rows.jsonl")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert run_cli(["data", "inspect", path]) == 0
    assert f"histogram written to {tmp_path / 'rows_token_lengths.png'}" in capsys.readouterr().out
    assert (tmp_path / "rows_token_lengths.png").exists() and not list(elsewhere.iterdir())


@needs_matplotlib
def test_histogram_axis_spans_the_data_not_max_seq_length():
    lengths = np.arange(50, 71)
    ax = histogram_figure(lengths, 2048).axes[0]
    assert ax.get_xlim()[1] < 80 and not ax.lines  # 60-token rows fill the axis; 2048 is off it, and said so
    assert "max_seq_length 2,048 is beyond the longest row" in ax.get_xlabel()
    ax = histogram_figure(lengths, 64).axes[0]
    assert [line.get_xdata()[0] for line in ax.lines] == [64]
