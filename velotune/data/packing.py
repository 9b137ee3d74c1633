"""First-fit packing: group examples into rows of at most max_seq_length tokens; what packing saves in padding."""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of examples grouped into bins of total length <= capacity, each example in the first bin it fits.

    Examples keep their order inside a bin; bins are ordered by their first example.
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens, more than the packing length {capacity}")
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    return bins


@dataclass
class PaddingStats:
    """Batch slots (rows x width, summed over batches) that collate fills, with and without packing."""

    batch_size: int
    batches: int  # batches measured
    total_batches: int  # batches in an epoch
    tokens: int  # real tokens in them
    slots_unpacked: int  # padded to the longest example of each batch
    slots_packed: int  # examples packed first-fit into rows of max_seq_length, padded to the longest row

    @property
    def waste_unpacked(self) -> float:
        """Fraction of slots that are padding without packing."""
        return 1 - self.tokens / self.slots_unpacked if self.slots_unpacked else 0.0

    @property
    def waste_packed(self) -> float:
        """Fraction of slots that are padding with packing."""
        return 1 - self.tokens / self.slots_packed if self.slots_packed else 0.0

    def describe(self) -> str:
        """E.g. "padding 38.2% of batch tokens without packing, 1.1% with packing (batches of 8)"."""
        sampled = f", {self.batches:,} of {self.total_batches:,} measured" if self.batches < self.total_batches else ""
        return (
            f"padding {100 * self.waste_unpacked:.1f}% of batch tokens without packing, "
            f"{100 * self.waste_packed:.1f}% with packing (batches of {self.batch_size}{sampled})"
        )


MAX_BATCHES = 4096  # padding is estimated on this many batches: enough for a stable figure, fast on any dataset


def padding_stats(
    lengths: Sequence[int] | np.ndarray, max_seq_length: int, batch_size: int = 8, seed: int = 0
) -> PaddingStats:
    """What collate pads for shuffled batches of `batch_size` examples, without and with packing.

    Batches are drawn as the trainer draws them (a seeded shuffle, then consecutive groups); at most MAX_BATCHES of
    them are measured.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(lengths))[: MAX_BATCHES * batch_size]
    tokens = slots_unpacked = slots_packed = batches = 0
    for start in range(0, len(order), batch_size):
        batch = lengths[order[start : start + batch_size]]
        batches += 1
        tokens += int(batch.sum())
        slots_unpacked += len(batch) * int(batch.max())
        rows = first_fit(batch.tolist(), max_seq_length)
        slots_packed += len(rows) * max(int(batch[row].sum()) for row in rows)
    total = -(-len(lengths) // batch_size)
    return PaddingStats(batch_size, batches, total, tokens, slots_unpacked, slots_packed)
