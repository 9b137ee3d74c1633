"""Chunked, batched tokenization gives exactly what tokenizing row by row gives, in file order, in bounded memory."""

import copy
import json

import numpy as np
import pytest

from velotune.data import DataConfig, build_datasets
from velotune.data import pipeline as pipeline_module
from velotune.data.dataset import fit_length, tokenize_row
from velotune.data.formats import apply_field_map, detect_format
from velotune.data.readers import read_rows
from velotune.data.store import StoreWriter
from velotune.data.templates import resolve_template
from velotune.errors import DataError

PIECES = [
    "hello",
    " world",
    "  two spaces",
    "trailing  ",
    "\n\nnew\n",
    "😀🎉",
    "日本語",
    "naïve café",
    " ",
    "\ttab",
    "x",
]


def text(i: int) -> str:
    return "".join(PIECES[(i * 7 + k * 3) % len(PIECES)] for k in range(1 + i % 3))


def mixed_rows(n: int) -> list[dict]:
    """Conversations of 1-2 turns, with and without system messages, odd whitespace and multi-byte characters."""
    rows = []
    for i in range(n):
        turns = [{"role": "user", "content": text(i)}, {"role": "assistant", "content": text(i + 1)}]
        if i % 3 == 0:
            turns += [{"role": "user", "content": text(i + 2)}, {"role": "assistant", "content": " " + text(i + 3)}]
        if i % 4 == 1:
            turns.insert(0, {"role": "system", "content": text(i + 4)})
        rows.append({"messages": turns})
    return rows


def reference(path: str, cfg: DataConfig, tokenizer) -> list[tuple]:
    """Examples made one row at a time with tokenize_row (the phase-1 path) and the same length policy."""
    out = []
    for source, row in read_rows(path):
        row = apply_field_map(row, cfg.field_map)
        fmt = cfg.format if cfg.format != "auto" else detect_format(row, source)
        template = resolve_template(tokenizer, cfg.template) if fmt != "text" else None
        ids, labels = tokenize_row(row, fmt, tokenizer, template, cfg, source)
        if not ids or (len(ids) > cfg.max_seq_length and cfg.too_long == "drop"):
            continue
        ids, labels, _ = fit_length(ids, labels, cfg.max_seq_length, cfg.too_long, source)
        if any(label != -100 for label in labels):
            out.append((ids, labels, source))
    return out


def examples(dataset) -> list[tuple]:
    return [(e["input_ids"], e["labels"], e["row"]) for e in dataset]


@pytest.mark.parametrize("template", [None, "llama-3", "alpaca", "gemma"])
@pytest.mark.parametrize("train_on", ["responses", "all"])
def test_batched_tokenization_matches_tokenizing_row_by_row(tokenizer, write_jsonl, template, train_on):
    path = write_jsonl(mixed_rows(40))
    cfg = DataConfig(path=path, template=template, train_on=train_on, max_seq_length=64, cache=False)
    train, _ = build_datasets(cfg, tokenizer)
    assert examples(train) == reference(path, cfg, tokenizer)


def test_text_and_alpaca_rows_match_row_by_row(tokenizer, write_jsonl):
    for rows in (
        [{"text": text(i)} for i in range(12)],
        [{"instruction": text(i), "output": text(i + 1)} for i in range(12)],
    ):
        path = write_jsonl(rows)
        cfg = DataConfig(path=path, system_prompt="Be brief.", cache=False)
        assert examples(build_datasets(cfg, tokenizer)[0]) == reference(path, cfg, tokenizer)


def test_chunk_size_does_not_change_the_result(tokenizer, write_jsonl, monkeypatch):
    path = write_jsonl(mixed_rows(30))
    cfg = DataConfig(path=path, max_seq_length=40, cache=False)
    whole = examples(build_datasets(cfg, tokenizer)[0])
    monkeypatch.setattr(pipeline_module, "CHUNK_ROWS", 4)
    assert examples(build_datasets(cfg, tokenizer)[0]) == whole


@pytest.mark.slow
def test_worker_processes_give_the_same_result_in_the_same_order(tokenizer, write_jsonl, monkeypatch):
    path = write_jsonl(mixed_rows(60))
    monkeypatch.setattr(pipeline_module, "CHUNK_ROWS", 8)
    serial = build_datasets(DataConfig(path=path, cache=False), tokenizer)[0]
    parallel = build_datasets(DataConfig(path=path, cache=False, num_proc=2), tokenizer)[0]
    assert examples(parallel) == examples(serial)


@pytest.mark.slow
def test_worker_processes_raise_the_first_error_in_file_order(tokenizer, write_jsonl, monkeypatch):
    rows = [{"instruction": "q", "output": "a"}] * 20 + [{"instruction": "q"}] + [{"instruction": "q", "output": "a"}]
    path = write_jsonl(rows)
    monkeypatch.setattr(pipeline_module, "CHUNK_ROWS", 4)
    with pytest.raises(DataError, match=rf'{path}:21: missing "output"'):
        build_datasets(DataConfig(path=path, cache=False, num_proc=2), tokenizer)


def test_first_error_in_file_order_wins_within_a_chunk(tokenizer, write_jsonl):
    long = {"instruction": "q", "output": "word " * 100}
    path = write_jsonl([{"instruction": "q", "output": "a"}, long, {"instruction": "q"}])
    with pytest.raises(DataError, match=rf"{path}:2: \d+ tokens, longer than max_seq_length 40"):
        build_datasets(DataConfig(path=path, max_seq_length=40, too_long="fail"), tokenizer)
    path = write_jsonl([{"instruction": "q", "output": "a"}, long, '{"broken'])
    with pytest.raises(DataError, match=rf"{path}:2: \d+ tokens, longer than max_seq_length 40"):
        build_datasets(DataConfig(path=path, max_seq_length=40, too_long="fail"), tokenizer)
    path = write_jsonl([{"instruction": "q", "output": "a"}, '{"broken', long])
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        build_datasets(DataConfig(path=path, max_seq_length=40, too_long="fail"), tokenizer)


def test_rows_stream_through_in_chunks_without_reading_ahead(tokenizer, write_jsonl, monkeypatch):
    """Memory stays bounded: the reader is never more than a few chunks ahead of what is written to disk."""
    path = write_jsonl([{"instruction": f"q{i}", "output": "a"} for i in range(50)])
    monkeypatch.setattr(pipeline_module, "CHUNK_ROWS", 5)
    read = []
    original_rows = pipeline_module.RowSource

    def counting_open_source(path, split=None, for_eval=False):
        def rows():
            for item in read_rows(path):
                read.append(item[0])
                yield item

        return original_rows(path, rows, lambda root: None)

    written = []
    original_append = StoreWriter.append

    def append(self, chunk):
        written.append((len(read), self.rows + len(chunk.sources)))
        original_append(self, chunk)

    monkeypatch.setattr("velotune.data.dataset.open_source", counting_open_source)
    monkeypatch.setattr(StoreWriter, "append", append)
    train, _ = build_datasets(DataConfig(path=path), tokenizer)
    assert len(train) == 50 and len(written) == 10
    assert max(n_read - n_written for n_read, n_written in written) <= 2 * 5


def test_dataset_is_array_backed_and_behaves_like_a_list(tokenizer, write_jsonl):
    path = write_jsonl([{"instruction": f"q{i}", "output": "a" * (i + 1)} for i in range(5)])
    train, _ = build_datasets(DataConfig(path=path), tokenizer)
    store = train.store
    assert store.ids.dtype == np.uint16 and isinstance(store.ids, np.memmap)  # SmolLM2: 49,152 ids
    item = train[-1]
    assert isinstance(item["input_ids"], list) and all(isinstance(t, int) for t in item["input_ids"])
    assert item["row"] == f"{path}:5"
    assert [e["row"] for e in train[1:3]] == [f"{path}:2", f"{path}:3"]
    assert train.lengths == [len(e["input_ids"]) for e in train]
    with pytest.raises(IndexError):
        train[5]


def test_parquet_and_csv_files_stream_to_the_same_examples(tokenizer, tmp_path, write_jsonl):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rows = [{"instruction": f"q{i}", "output": f"answer {i}"} for i in range(7)]
    jsonl = build_datasets(DataConfig(path=write_jsonl(rows)), tokenizer)[0]
    parquet = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    csv = tmp_path / "d.csv"
    csv.write_text("instruction,output\n" + "".join(f"{r['instruction']},{r['output']}\n" for r in rows))
    ids = [e["input_ids"] for e in jsonl]
    assert [e["input_ids"] for e in build_datasets(DataConfig(path=str(parquet)), tokenizer)[0]] == ids
    assert [e["input_ids"] for e in build_datasets(DataConfig(path=str(csv)), tokenizer)[0]] == ids
    assert build_datasets(DataConfig(path=str(parquet)), tokenizer)[0][0]["row"] == f"{parquet}:row 1"


def test_progress_bar_reports_rows(tokenizer, write_jsonl, capsys):
    path = write_jsonl([{"instruction": "q", "output": json.dumps(i)} for i in range(3)])
    build_datasets(DataConfig(path=path, cache=False), tokenizer, progress=True)
    assert "tokenizing train" in capsys.readouterr().err


def test_truncation_left_set_on_the_tokenizer_does_not_cut_rows(tokenizer, write_jsonl):
    path = write_jsonl([{"instruction": "q " * 20, "output": "a " * 20}])
    expected = examples(build_datasets(DataConfig(path=path, cache=False), tokenizer)[0])
    other = copy.deepcopy(tokenizer)
    other(["x " * 50], truncation=True, max_length=8)  # leaves truncation set on the Rust backend
    assert examples(build_datasets(DataConfig(path=path, cache=False), other)[0]) == expected
