"""Collate tokenized examples into padded (or packed) tensors for the model."""

import torch

from velotune.data.masking import IGNORE
from velotune.data.packing import first_fit


def collate(
    examples: list[dict], pad_id: int, *, packing: bool = False, max_seq_length: int | None = None
) -> dict[str, torch.Tensor]:
    """Batch examples into input_ids, labels, attention_mask and position_ids, all [B, T] long, right-padded.

    position_ids restart at 0 at every example start, so with packing=True (examples concatenated first-fit into
    rows of at most max_seq_length tokens) the model can find example boundaries. The label of each example's first
    token is masked: in a packed row it would be predicted from the previous example, and unpacked it is never
    predicted, so packed and unpacked batches hold the same targets. Padding is its own trailing segment
    (positions from 0, attention_mask 0, labels masked).
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    if packing:
        if max_seq_length is None:
            raise ValueError("collate(packing=True) needs max_seq_length")
        rows = first_fit([len(e["input_ids"]) for e in examples], max_seq_length)
    else:
        rows = [[i] for i in range(len(examples))]
    width = max(sum(len(examples[i]["input_ids"]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)  # [B, T]
    for b, row in enumerate(rows):
        t = 0
        for i in row:
            ids, lab = examples[i]["input_ids"], examples[i]["labels"]
            assert len(ids) == len(lab), f"example {i}: {len(ids)} input_ids but {len(lab)} labels"
            n = len(ids)
            input_ids[b, t : t + n] = torch.as_tensor(ids, dtype=torch.long)
            labels[b, t : t + n] = torch.as_tensor(lab, dtype=torch.long)
            labels[b, t] = IGNORE
            attention_mask[b, t : t + n] = 1
            position_ids[b, t : t + n] = torch.arange(n)
            t += n
        position_ids[b, t:] = torch.arange(width - t)
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids}
