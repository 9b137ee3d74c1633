"""First-fit packing: group examples into rows of at most max_seq_length tokens."""


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
