"""collate: padded and packed batches hold the same tokens and targets, with positions restarting per example."""

import pytest
import torch

from velotune.data import collate
from velotune.data.packing import first_fit

PAD = 0


def ex(ids: list[int], labels: list[int] | None = None) -> dict:
    return {"input_ids": ids, "labels": list(ids) if labels is None else labels, "row": "d:1"}


EXAMPLES = [
    ex([11, 12, 13, 14, 15], [-100, -100, 13, 14, 15]),
    ex([21, 22, 23]),
    ex([31, 32, 33, 34, 35, 36], [-100, -100, -100, -100, 35, 36]),
    ex([41, 42]),
]


def test_padded_batch_is_right_padded_and_masked():
    batch = collate(EXAMPLES[:2], PAD)
    assert batch["input_ids"].tolist() == [[11, 12, 13, 14, 15], [21, 22, 23, PAD, PAD]]
    assert batch["labels"].tolist() == [[-100, -100, 13, 14, 15], [-100, 22, 23, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["position_ids"][:, :3].tolist() == [[0, 1, 2], [0, 1, 2]]
    assert all(t.dtype == torch.long and t.shape == (2, 5) for t in batch.values())


def _per_example(batch: dict[str, torch.Tensor]) -> list[tuple[list[int], list[int]]]:
    """Split rows at position_ids resets, keeping real (attention_mask 1) tokens only."""
    out = []
    for ids, labels, pos, mask in zip(
        *(batch[k].tolist() for k in ("input_ids", "labels", "position_ids", "attention_mask")), strict=True
    ):
        for t in range(len(ids)):
            if not mask[t]:
                break
            if pos[t] == 0:
                out.append(([], []))
            out[-1][0].append(ids[t])
            out[-1][1].append(labels[t])
    return out


def test_packing_restarts_positions_and_keeps_tokens_and_labels():
    packed = collate(EXAMPLES, PAD, packing=True, max_seq_length=8)
    padded = collate(EXAMPLES, PAD)
    # First fit into rows of 8: [5 + 3], [6 + 2].
    assert packed["input_ids"].shape == (2, 8)
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1]]
    assert packed["attention_mask"].sum().item() == sum(len(e["input_ids"]) for e in EXAMPLES)
    assert sorted(_per_example(packed)) == sorted(_per_example(padded))
    # No example's first token is a target: in a packed row it would be predicted from the previous example.
    assert packed["labels"][0, 5].item() == -100 and packed["labels"][1, 6].item() == -100


def test_packed_rows_are_padded_at_the_end():
    batch = collate([ex([1, 2, 3]), ex([4, 5, 6])], PAD, packing=True, max_seq_length=4)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6]]
    batch = collate([ex([1, 2, 3]), ex([4, 5]), ex([6, 7, 8, 9])], PAD, packing=True, max_seq_length=5)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, PAD]]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 0]
    assert batch["labels"][1, 4].item() == -100


def test_first_fit_fills_earlier_rows_first():
    assert first_fit([5, 3, 6, 2, 1], 8) == [[0, 1], [2, 3], [4]]
    assert first_fit([6, 6, 2, 2], 8) == [[0, 2], [1, 3]]


def test_packing_an_example_longer_than_the_row_is_refused():
    with pytest.raises(ValueError, match="example 0 has 5 tokens, more than the packing length 4"):
        collate([ex([1, 2, 3, 4, 5])], PAD, packing=True, max_seq_length=4)
