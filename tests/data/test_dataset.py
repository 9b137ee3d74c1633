"""build_datasets: every row read is used or dropped with a reason; length policies and eval splits behave."""

import pytest

from velotune.data import DataConfig, build_datasets
from velotune.errors import ConfigError, DataError

LONG = "word " * 300


def alpaca(i: int, output: str = "ok") -> dict:
    return {"instruction": f"Question {i}?", "input": "", "output": output}


def test_examples_carry_row_names_and_tokens(tokenizer, write_jsonl, targets):
    path = write_jsonl([alpaca(0, "zero"), "", alpaca(1, "one")])
    train, eval_set = build_datasets(DataConfig(path=path), tokenizer)
    assert eval_set is None
    assert [e["row"] for e in train] == [f"{path}:1", f"{path}:3"]
    assert [targets(e["input_ids"], e["labels"]) for e in train] == [["zero<|im_end|>"], ["one<|im_end|>"]]
    s = train.stats
    assert (s.rows_read, s.rows_used, s.rows_dropped, s.format) == (2, 2, 0, "alpaca")
    assert s.tokens == sum(len(e["input_ids"]) for e in train)
    assert s.target_tokens == sum(t != -100 for e in train for t in e["labels"])


def test_too_long_truncate_cuts_and_counts(tokenizer, write_jsonl):
    path = write_jsonl([alpaca(0), alpaca(1, LONG)])
    train, _ = build_datasets(DataConfig(path=path, max_seq_length=64, too_long="truncate"), tokenizer)
    assert len(train) == 2 and train.stats.truncated == 1
    assert max(len(e["input_ids"]) for e in train) == 64
    assert "truncated 1 to max_seq_length 64 tokens" in train.report()


def test_too_long_drop_counts_reason_and_names_row(tokenizer, write_jsonl):
    path = write_jsonl([alpaca(0), alpaca(1, LONG), alpaca(2)])
    train, _ = build_datasets(DataConfig(path=path, max_seq_length=64, too_long="drop"), tokenizer)
    assert [e["row"] for e in train] == [f"{path}:1", f"{path}:3"]
    assert train.stats.dropped == {"longer than max_seq_length 64": 1}
    report = train.report()
    assert "read 3 rows" in report and "used 2" in report
    assert f"1 longer than max_seq_length 64 (e.g. {path}:2)" in report


def test_too_long_fail_names_row_length_and_options(tokenizer, write_jsonl):
    path = write_jsonl([alpaca(0), alpaca(1, LONG)])
    with pytest.raises(
        DataError,
        match=rf"{path}:2: \d+ tokens, longer than max_seq_length 64; raise "
        r"max_seq_length, or set too_long to truncate or drop",
    ):
        build_datasets(DataConfig(path=path, max_seq_length=64, too_long="fail"), tokenizer)


def test_row_whose_targets_are_all_truncated_away_is_dropped(tokenizer, write_jsonl):
    path = write_jsonl([alpaca(0), {"instruction": LONG, "output": "late answer"}])
    train, _ = build_datasets(DataConfig(path=path, max_seq_length=64), tokenizer)
    assert [e["row"] for e in train] == [f"{path}:1"]
    assert train.stats.dropped == {"no target tokens after truncation": 1}
    assert train.stats.rows_read == train.stats.rows_used + train.stats.rows_dropped


def test_conversation_without_assistant_turn_is_dropped_not_lost(tokenizer, write_jsonl):
    path = write_jsonl(
        [
            {"messages": [{"role": "user", "content": "hi"}]},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        ]
    )
    train, _ = build_datasets(DataConfig(path=path), tokenizer)
    assert len(train) == 1 and train.stats.dropped == {"no target tokens": 1}


def test_text_format_needs_no_chat_template(tokenizer, write_jsonl):
    path = write_jsonl([{"text": "Plain text for pre-training."}])
    train, _ = build_datasets(DataConfig(path=path, template=None), tokenizer)
    assert train.stats.format == "text"
    assert train[0]["labels"] == train[0]["input_ids"]
    assert train[0]["input_ids"][-1] == tokenizer.eos_token_id


def test_eval_split_is_deterministic_disjoint_and_complete(tokenizer, write_jsonl):
    path = write_jsonl([alpaca(i) for i in range(20)])
    cfg = DataConfig(path=path, eval_split=0.2, seed=3)
    train, eval_set = build_datasets(cfg, tokenizer)
    train_rows, eval_rows = [e["row"] for e in train], [e["row"] for e in eval_set]
    assert len(eval_rows) == 4 and len(train_rows) == 16
    assert sorted(train_rows + eval_rows, key=lambda r: int(r.rsplit(":", 1)[1])) == [
        f"{path}:{i}" for i in range(1, 21)
    ]
    again = build_datasets(cfg, tokenizer)[1]
    assert [e["row"] for e in again] == eval_rows
    other = build_datasets(DataConfig(path=path, eval_split=0.2, seed=4), tokenizer)[1]
    assert [e["row"] for e in other] != eval_rows
    assert eval_set.stats.name == "eval" and eval_set.stats.rows_read == 4


def test_eval_path_is_read_as_its_own_dataset(tokenizer, write_jsonl):
    path = write_jsonl([alpaca(0)], "train.jsonl")
    eval_path = write_jsonl([{"prompt": "p", "completion": "c"}], "eval.jsonl")
    train, eval_set = build_datasets(DataConfig(path=path, eval_path=eval_path), tokenizer)
    assert (len(train), len(eval_set), eval_set.stats.format) == (1, 1, "prompt_completion")


def test_field_map_applies_to_every_row(tokenizer, write_jsonl, targets):
    path = write_jsonl([{"q": "Why?", "a": "Because."}])
    cfg = DataConfig(path=path, field_map={"q": "prompt", "a": "completion"})
    train, _ = build_datasets(cfg, tokenizer)
    assert targets(train[0]["input_ids"], train[0]["labels"]) == ["Because.<|im_end|>"]


def test_row_missing_a_field_of_the_detected_format_names_its_line(tokenizer, write_jsonl):
    path = write_jsonl([alpaca(0), {"instruction": "i", "answer": "a"}])
    with pytest.raises(DataError, match=rf'{path}:2: missing "output"; alpaca rows need instruction and output'):
        build_datasets(DataConfig(path=path), tokenizer)


def test_dataset_with_every_row_dropped_is_an_error_with_the_report(tokenizer, write_jsonl):
    path = write_jsonl([alpaca(1, LONG), alpaca(2, LONG)])
    with pytest.raises(
        DataError,
        match=r"no usable train rows: train: read 2 rows .* dropped 2: 2 longer than "
        r"max_seq_length 64 .*Raise max_seq_length",
    ):
        build_datasets(DataConfig(path=path, max_seq_length=64, too_long="drop"), tokenizer)


def test_empty_dataset_is_an_error(tokenizer, write_jsonl):
    path = write_jsonl(["", ""])
    with pytest.raises(DataError, match=rf"{path}: no rows found"):
        build_datasets(DataConfig(path=path), tokenizer)


def test_missing_path_is_a_config_error(tokenizer):
    with pytest.raises(ConfigError, match=r"no dataset is set"):
        build_datasets(DataConfig(), tokenizer)
