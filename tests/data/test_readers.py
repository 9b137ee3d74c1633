"""Readers: every supported file type yields rows named file:line, and broken files say where and how to fix."""

import json
import sys

import pytest

from velotune.data.readers import read_rows
from velotune.errors import DataError


def test_jsonl_rows_are_named_by_file_and_line_and_blank_lines_skipped(write_jsonl):
    path = write_jsonl([{"text": "a"}, "", "   ", {"text": "b"}])
    rows = list(read_rows(path))
    assert rows == [(f"{path}:1", {"text": "a"}), (f"{path}:4", {"text": "b"})]


def test_malformed_jsonl_reports_file_and_line(write_jsonl):
    path = write_jsonl([{"text": "a"}, {"text": "b"}, '{"text": "c",'])
    with pytest.raises(DataError, match=rf"{path}:3: not valid JSON \(.+\)"):
        list(read_rows(path))


def test_jsonl_line_that_is_not_an_object_is_reported(write_jsonl):
    path = write_jsonl([{"text": "a"}, "[1, 2]"])
    with pytest.raises(DataError, match=rf"{path}:2: expected a JSON object .* found list"):
        list(read_rows(path))


def test_non_utf8_jsonl_reports_line_and_how_to_reencode(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"{path}:2: not valid UTF-8.*re-encode the file as UTF-8"):
        list(read_rows(path))


def test_non_utf8_csv_reports_line(tmp_path):
    path = tmp_path / "latin.csv"
    path.write_bytes(b"text\nok\ncaf\xe9\n")
    with pytest.raises(DataError, match=rf"{path}:3: not valid UTF-8.*re-encode"):
        list(read_rows(path))


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=rf"{path}: file not found"):
        read_rows(path)


def test_unknown_extension_lists_supported_types(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_text("x")
    with pytest.raises(DataError, match=r"unknown file type '.xlsx'.*\.jsonl.*\.parquet"):
        read_rows(path)


def test_json_list_rows_keep_their_line_numbers(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "a"},\n  {"text":\n    "b"},\n\n  {"text": "c"}\n]\n', encoding="utf-8")
    assert list(read_rows(path)) == [
        (f"{path}:2", {"text": "a"}),
        (f"{path}:3", {"text": "b"}),
        (f"{path}:6", {"text": "c"}),
    ]


def test_malformed_json_list_reports_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"text": "a"},\n  {"text": "b"\n  {"text": "c"}\n]\n', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:4: not valid JSON"):
        list(read_rows(path))


def test_json_file_holding_json_lines_is_read_as_jsonl(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert [row for _, row in read_rows(path)] == [{"text": "a"}, {"text": "b"}]


def test_csv_rows_are_text_named_by_starting_line(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text('instruction,output\nsay hi,"hi,\nthere"\nsay bye,bye\n', encoding="utf-8")
    assert list(read_rows(path)) == [
        (f"{path}:2", {"instruction": "say hi", "output": "hi,\nthere"}),
        (f"{path}:4", {"instruction": "say bye", "output": "bye"}),
    ]


def test_csv_row_with_wrong_column_count_is_reported(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("prompt,completion\na,b\na,b,c\n", encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path}:3: 3 columns, but the header has 2"):
        list(read_rows(path))


def test_tsv_is_read_with_tabs(tmp_path):
    path = tmp_path / "data.tsv"
    path.write_text("prompt\tcompletion\na, b\tc\n", encoding="utf-8")
    assert [row for _, row in read_rows(path)] == [{"prompt": "a, b", "completion": "c"}]


def test_parquet_rows_round_trip_including_nested_messages(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
    ]
    path = tmp_path / "data.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert list(read_rows(path)) == [(f"{path}:row 1", rows[0]), (f"{path}:row 2", rows[1])]


def test_parquet_without_pyarrow_names_the_package_to_install(tmp_path, monkeypatch):
    path = tmp_path / "data.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"needs pyarrow.*pip install pyarrow"):
        list(read_rows(path))


def test_jsonl_with_utf8_bom_reads(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "a"}).encode() + b"\n")
    assert [row for _, row in read_rows(path)] == [{"text": "a"}]
