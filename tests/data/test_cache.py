"""Tokenization cache: a second build with the same inputs is a hit with the same examples and stats; any change
to the data, the tokenizer's template or a tokenizing setting is a miss."""

import copy
import dataclasses
import json
import os
import shutil
import time

import pytest

from velotune.data import DataConfig, build_datasets
from velotune.errors import DataError

TIMING = {"seconds", "cache_hit", "cache_path", "cache_note", "rows_tokenized"}


def alpaca(i: int, output: str = "ok") -> dict:
    return {"instruction": f"Question {i}?", "input": "", "output": output}


def stats_without_timing(dataset) -> dict:
    return {k: v for k, v in dataclasses.asdict(dataset.stats).items() if k not in TIMING}


def examples(dataset) -> list[tuple]:
    return [(e["input_ids"], e["labels"], e["row"]) for e in dataset]


def entries(root) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name != "fingerprints") if root.exists() else []


def test_second_build_is_a_cache_hit_with_the_same_examples_stats_and_report(tokenizer, write_jsonl, cache_home):
    rows = [alpaca(0), alpaca(1, "word " * 80), {"instruction": "x", "output": ""}, alpaca(3)]
    path = write_jsonl(rows)
    cfg = DataConfig(path=path, max_seq_length=48, too_long="drop")
    first, _ = build_datasets(cfg, tokenizer)
    assert not first.stats.cache_hit and first.stats.cache_path.startswith(str(cache_home))
    second, _ = build_datasets(cfg, tokenizer)
    assert second.stats.cache_hit and second.stats.cache_path == first.stats.cache_path
    assert examples(second) == examples(first)
    assert stats_without_timing(second) == stats_without_timing(first)
    assert first.stats.dropped == {"longer than max_seq_length 48": 1}
    assert second.report().rsplit(" Loaded", 1)[0] == first.report().rsplit(" Tokenized", 1)[0]
    assert "Loaded from cache" in second.report() and "rows/s" in first.report()
    assert len(entries(cache_home)) == 1


def test_changing_the_file_is_a_miss(tokenizer, write_jsonl):
    path = write_jsonl([alpaca(0), alpaca(1)])
    first, _ = build_datasets(DataConfig(path=path), tokenizer)
    stat = os.stat(path)
    write_jsonl([alpaca(0), alpaca(2)])  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and same mtime: the content decides
    second, _ = build_datasets(DataConfig(path=path), tokenizer)
    assert not second.stats.cache_hit
    assert examples(second) != examples(first)


def test_changing_max_seq_length_or_template_is_a_miss(tokenizer, write_jsonl):
    path = write_jsonl([alpaca(0)])
    build_datasets(DataConfig(path=path), tokenizer)
    assert not build_datasets(DataConfig(path=path, max_seq_length=100), tokenizer)[0].stats.cache_hit
    assert not build_datasets(DataConfig(path=path, template="llama-3"), tokenizer)[0].stats.cache_hit
    assert build_datasets(DataConfig(path=path, template="llama-3"), tokenizer)[0].stats.cache_hit


def test_changing_the_tokenizers_chat_template_is_a_miss(tokenizer, write_jsonl, targets):
    path = write_jsonl([alpaca(0, "zero")])
    build_datasets(DataConfig(path=path), tokenizer)
    other = copy.deepcopy(tokenizer)
    other.chat_template = tokenizer.chat_template.replace("<|im_end|>", "<|im_end|><|endoftext|>")
    train, _ = build_datasets(DataConfig(path=path), other)
    assert not train.stats.cache_hit
    assert targets(train[0]["input_ids"], train[0]["labels"]) == ["zero<|im_end|><|endoftext|>"]


def test_a_copied_file_hits_and_names_rows_by_its_own_path(tokenizer, write_jsonl, tmp_path):
    path = write_jsonl([alpaca(0), alpaca(1, "word " * 80)])
    build_datasets(DataConfig(path=path, max_seq_length=48, too_long="drop"), tokenizer)
    moved = str(tmp_path / "moved.jsonl")
    shutil.copy(path, moved)
    train, _ = build_datasets(DataConfig(path=moved, max_seq_length=48, too_long="drop"), tokenizer)
    assert train.stats.cache_hit
    assert train[0]["row"] == f"{moved}:1"
    assert train.stats.dropped_rows == {"longer than max_seq_length 48": [f"{moved}:2"]}


def test_eval_split_is_drawn_from_the_cached_rows(tokenizer, write_jsonl):
    path = write_jsonl([alpaca(i) for i in range(10)])
    train, held = build_datasets(DataConfig(path=path, eval_split=0.2, seed=1), tokenizer)
    again, held_again = build_datasets(DataConfig(path=path, eval_split=0.3, seed=2), tokenizer)
    assert again.stats.cache_hit and held_again.stats.cache_hit
    assert (len(train), len(held), len(again), len(held_again)) == (8, 2, 7, 3)


def test_cache_dir_setting_and_cache_off(tokenizer, write_jsonl, tmp_path, cache_home):
    path = write_jsonl([alpaca(0)])
    own = tmp_path / "own-cache"
    train, _ = build_datasets(DataConfig(path=path, cache_dir=str(own)), tokenizer)
    assert train.stats.cache_path.startswith(str(own)) and len(entries(own)) == 1
    off, _ = build_datasets(DataConfig(path=path, cache=False), tokenizer)
    assert not off.stats.cache_hit and off.stats.cache_path == "" and entries(cache_home) == []
    assert examples(off) == examples(train)


def test_a_failed_build_leaves_no_cache_entry(tokenizer, write_jsonl, cache_home):
    path = write_jsonl([alpaca(0), json.dumps(alpaca(1))[:-3]])
    with pytest.raises(DataError, match=rf"{path}:2: not valid JSON"):
        build_datasets(DataConfig(path=path), tokenizer)
    assert entries(cache_home) == []


def test_unwritable_cache_dir_falls_back_to_no_cache(tokenizer, write_jsonl, tmp_path):
    path = write_jsonl([alpaca(0)])
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    train, _ = build_datasets(DataConfig(path=path, cache_dir=str(blocker / "sub")), tokenizer)
    assert len(train) == 1 and not train.stats.cache_hit
    assert "not cached" in train.report()


def test_work_directories_left_by_killed_runs_are_removed(tokenizer, write_jsonl, cache_home):
    stale, fresh = cache_home / ".abc.1.x.tmp", cache_home / ".def.2.y.tmp"
    for work in (stale, fresh):
        work.mkdir(parents=True)
        (work / "ids.bin").write_bytes(b"")
    old = time.time() - 2 * 24 * 3600
    os.utime(stale / "ids.bin", (old, old))
    os.utime(stale, (old, old))
    build_datasets(DataConfig(path=write_jsonl([alpaca(0)])), tokenizer)
    assert not stale.exists() and fresh.exists()


def test_a_damaged_cache_entry_is_rebuilt(tokenizer, write_jsonl):
    path = write_jsonl([alpaca(0), alpaca(1)])
    first, _ = build_datasets(DataConfig(path=path), tokenizer)
    entry = first.stats.cache_path
    del first
    with open(os.path.join(entry, "ids.bin"), "r+b") as f:
        f.truncate(3)
    again, _ = build_datasets(DataConfig(path=path), tokenizer)
    assert not again.stats.cache_hit and again.stats.cache_path == entry
    assert build_datasets(DataConfig(path=path), tokenizer)[0].stats.cache_hit
