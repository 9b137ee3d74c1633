"""`velotune data inspect`: format, row accounting, length histogram (text and PNG), masked examples."""

import argparse
import importlib.util
import sys

import numpy as np
import pytest

from velotune.cli import data as data_cmd
from velotune.data.inspection import histogram, show_example


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
    assert run_cli(["data", "inspect", path, "--max_seq_length", "48", "--png", str(png), "--color", "never"]) == 0
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
