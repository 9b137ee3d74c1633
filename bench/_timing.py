"""Timing and memory measurement shared by the kernel benches (CUDA only).

`measure` runs a step a few times after warm-up and reports its median time with CUDA events, the memory its
forward leaves allocated for backward, and its peak memory, both above what was allocated before it started.
Benches import this module before velotune, so `python bench/bench_<op>.py` works from a checkout.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: benches import velotune after this

MIB = 2**20


@dataclass
class Result:
    name: str
    fwd_ms: float
    fwd_bwd_ms: float
    saved_mib: float  # allocated after forward (graph alive) minus before
    peak_mib: float  # peak during forward + backward minus allocated before


def _time(fn: Callable[[], object], iters: int) -> float:
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(
    name: str, forward: Callable[[], torch.Tensor], backward: Callable[[torch.Tensor], None], iters: int = 10
) -> Result:
    """forward() builds the graph and returns its output; backward(out) runs backward from it."""

    def step() -> None:
        backward(forward())

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    fwd_ms = _time(forward, iters)
    fwd_bwd_ms = _time(step, iters)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = forward()
    torch.cuda.synchronize()
    saved = torch.cuda.memory_allocated() - before
    backward(out)
    del out
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    return Result(name, fwd_ms, fwd_bwd_ms, saved / MIB, peak / MIB)


def print_table(title: str, results: list[Result]) -> None:
    """One row per result; ratios are against the first row (the reference)."""
    ref = results[0]
    print(f"\n{title}  [{torch.cuda.get_device_name()}, torch {torch.__version__}]")
    head = f"{'impl':<34}{'fwd ms':>9}{'fwd+bwd ms':>12}{'speedup':>9}{'saved MiB':>11}{'peak MiB':>10}{'peak x':>8}"
    print(head)
    print("-" * len(head))
    for r in results:
        speedup = ref.fwd_bwd_ms / r.fwd_bwd_ms if r.fwd_bwd_ms else float("nan")
        peak_ratio = r.peak_mib / ref.peak_mib if ref.peak_mib else float("nan")
        print(
            f"{r.name:<34}{r.fwd_ms:>9.3f}{r.fwd_bwd_ms:>12.3f}{speedup:>9.2f}"
            f"{r.saved_mib:>11.1f}{r.peak_mib:>10.1f}{peak_ratio:>8.2f}"
        )


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("benches need a CUDA GPU")
