"""A packed batch gives each example the loss it has when run alone (attention and targets stop at boundaries)."""

import torch

from tests.helpers import velotune_from_hf
from velotune.data import collate


def _examples():
    g = torch.Generator().manual_seed(4)
    out = []
    for length, prompt in ((9, 3), (14, 6), (5, 1), (11, 0)):
        ids = torch.randint(3, 128, (length,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "row": f"r{length}"})
    return out


def _loss_sum(model, batch):
    keys = ("input_ids", "labels", "attention_mask", "position_ids")
    with torch.no_grad():
        return float(model(**{k: batch[k] for k in keys}, num_items_in_batch=1).loss)


def test_packed_batch_gives_each_example_its_own_loss(tiny_hf_llama):
    model = velotune_from_hf(tiny_hf_llama)
    examples = _examples()
    packed = collate(examples, pad_id=0, packing=True, max_seq_length=64)
    assert packed["input_ids"].shape[0] == 1  # all four share one row, no padding between them
    alone = [_loss_sum(model, collate([e], pad_id=0)) for e in examples]
    torch.testing.assert_close(_loss_sum(model, packed), sum(alone), rtol=1e-5, atol=1e-5)
    starts = (packed["position_ids"][0] == 0).nonzero().flatten().tolist() + [packed["input_ids"].shape[1]]
    for i, want in enumerate(alone):  # keep one example's targets at a time
        only = {k: v.clone() for k, v in packed.items()}
        keep = torch.zeros_like(only["labels"], dtype=torch.bool)
        keep[0, starts[i] : starts[i + 1]] = True
        only["labels"][~keep] = -100
        got = _loss_sum(model, only)
        assert abs(got - want) < 1e-4 * max(1.0, abs(want)), (i, got, want)
