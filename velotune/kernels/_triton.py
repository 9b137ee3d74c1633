"""Triton availability and launch helpers shared by the kernel files.

Every kernel file imports `triton`/`tl` from here, so a CPU-only install without Triton imports cleanly and takes
the PyTorch references. `use_triton(*tensors)` is the one dispatch test: Triton when it is importable and the
tensors are on CUDA. Tests running Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors enter
`triton_on_cpu()`; nothing else reads or changes that switch.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: every op takes its reference
    triton = None
    tl = None

HAS_TRITON = triton is not None
log = logging.getLogger("velotune.kernels")
_NOTICED: set[tuple[str, str]] = set()

# Largest row (in elements) one program keeps in registers; RMSNorm rows and RoPE heads are far below it.
MAX_FUSED_SIZE = 65536
_on_cpu = False


@contextlib.contextmanager
def triton_on_cpu() -> Iterator[None]:
    """Send CPU tensors to the Triton kernels too, for tests under Triton's interpreter (TRITON_INTERPRET=1)."""
    global _on_cpu
    previous, _on_cpu = _on_cpu, True
    try:
        yield
    finally:
        _on_cpu = previous


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the Triton kernels should run for these tensors: Triton importable and every tensor on CUDA."""
    return HAS_TRITON and all(t.is_cuda or _on_cpu for t in tensors)


def reference_notice(op: str, reason: str, *tensors: torch.Tensor) -> None:
    """Say once per (op, reason) that GPU tensors take an op's PyTorch reference instead of its fused kernel: no
    model silently loses a fast path. CPU tensors (where the reference is the path) say nothing."""
    if not any(t.is_cuda for t in tensors) or (op, reason) in _NOTICED:
        return
    _NOTICED.add((op, reason))
    log.warning("velotune: %s runs its PyTorch reference on the GPU (%s): same results, slower", op, reason)


def no_triton_reason() -> str:
    return "Triton is not importable: pip install triton"


def dense_rows(t: torch.Tensor) -> torch.Tensor | None:
    """t's memory as [rows, t.shape[-1]] with unit column stride, or None when t is not dense.

    A dense, non-overlapping tensor whose last dimension has stride 1 stores whole rows back to back in some order
    of its leading dimensions (a transposed [B, T, H, D] -> [B, H, T, D] view, say). A row-wise op can run over that
    memory directly, and an output made by `torch.empty_like(t)` has the same layout, so no copy is needed.
    """
    n = t.shape[-1]
    if t.dim() == 0 or t.numel() == 0 or (t.stride(-1) != 1 and n > 1):
        return None
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape, strict=True) if sz > 1):
        if stride != expected:
            return None
        expected *= size
    return t.as_strided((t.numel() // n, n), (n, 1))


def next_power_of_2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def row_block(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a kernel that holds one row of n_cols elements in registers."""
    block = next_power_of_2(n_cols)
    if block > MAX_FUSED_SIZE:
        raise ValueError(f"a row of {n_cols} elements exceeds the fused kernel limit of {MAX_FUSED_SIZE}")
    num_warps = 4
    if block >= 2048:
        num_warps = 8
    if block >= 8192:
        num_warps = 16
    if block >= 32768:
        num_warps = 32
    return block, num_warps


def num_programs(device: torch.device, waves: int = 4) -> int:
    """A persistent-kernel grid size: `waves` programs per streaming multiprocessor (a small constant on CPU)."""
    if device.type != "cuda":
        return 4
    return waves * _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
