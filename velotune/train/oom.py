"""Running out of GPU memory: recognising it, freeing what can be freed, and searching for a micro-batch that fits.

Out-of-memory errors are recognised by their type's name (torch.cuda.OutOfMemoryError, torch.OutOfMemoryError, or
the simulated one in faults.py), so the recovery path runs, and is tested, on machines without a GPU.
"""

from __future__ import annotations

import gc
from collections.abc import Callable

import torch


def is_out_of_memory(exc: BaseException) -> bool:
    return any(t.__name__ == "OutOfMemoryError" for t in type(exc).__mro__)


def free_memory() -> None:
    """Collect garbage (tensors held by a dropped traceback) and return cached CUDA blocks to the driver."""
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def largest_fitting(start: int, fits: Callable[[int], bool]) -> int | None:
    """The first of start, start // 2, ..., 1 for which fits() is true, or None."""
    size = start
    while size >= 1:
        if fits(size):
            return size
        size //= 2
    return None


def optimizer_state_bytes(params: list[torch.nn.Parameter], optim: str) -> int:
    """Memory the optimizer will allocate at its first step for `params` (AdamW: two states per value)."""
    numel = sum(p.numel() for p in params)
    if optim in ("adamw_torch", "adamw_torch_fused"):
        return sum(2 * p.numel() * p.element_size() for p in params)
    if optim == "adamw_8bit":
        return numel * 2 + numel * 8 // 256
    return 0
