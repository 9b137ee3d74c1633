"""Padding report: the share of batch slots collate fills with padding, without and with packing."""

import numpy as np

from velotune.data import DataConfig, build_datasets, collate
from velotune.data.packing import padding_stats


def test_padding_stats_match_what_collate_builds():
    lengths = [5, 3, 6, 2, 1, 4, 7, 2, 3]
    stats = padding_stats(lengths, max_seq_length=8, batch_size=4, seed=0)
    examples = [{"input_ids": [1] * n, "labels": [1] * n} for n in lengths]
    order = np.random.default_rng(0).permutation(len(lengths))
    unpacked = packed = 0
    for start in range(0, len(order), 4):
        batch = [examples[i] for i in order[start : start + 4]]
        unpacked += collate(batch, 0)["input_ids"].numel()
        packed += collate(batch, 0, packing=True, max_seq_length=8)["input_ids"].numel()
    assert (stats.tokens, stats.slots_unpacked, stats.slots_packed) == (sum(lengths), unpacked, packed)
    assert stats.batches == stats.total_batches == 3
    assert 0 <= stats.waste_packed < stats.waste_unpacked < 1


def test_report_shows_padding_without_and_with_packing(tokenizer, write_jsonl):
    path = write_jsonl([{"instruction": "q", "output": "a " * (1 + 7 * i)} for i in range(16)])
    train, _ = build_datasets(DataConfig(path=path, max_seq_length=512), tokenizer)
    padding = train.padding(batch_size=8)
    assert padding.waste_packed < padding.waste_unpacked
    assert f"padding {100 * padding.waste_unpacked:.1f}% of batch tokens without packing, " in train.report()
    assert "with packing (batches of 8)" in train.report()
    assert "(batches of 4)" in train.report(batch_size=4)
