"""RMSNorm forward + backward at Llama-3.1-8B shapes: Triton kernel vs the PyTorch reference (CUDA).

python bench/bench_rms_norm.py [--tokens 4096 --hidden 4096]
"""

from __future__ import annotations

import argparse

import torch
from _timing import Result, measure, print_table, require_cuda

from velotune.kernels.rms_norm import rms_norm, rms_norm_reference


def bench(tokens: int, hidden: int, train_weight: bool) -> list[Result]:
    x = torch.randn(tokens, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(hidden, device="cuda", requires_grad=train_weight)
    dy = torch.randn_like(x)
    inputs = [t for t in (x, w) if t.requires_grad]

    def backward(out: torch.Tensor) -> None:
        torch.autograd.grad(out, inputs, dy)

    return [
        measure("reference (torch)", lambda: rms_norm_reference(x, w, 1e-5), backward),
        measure("triton", lambda: rms_norm(x, w, 1e-5), backward),
    ]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=4096)
    args = p.parse_args()
    require_cuda()
    for train_weight in (False, True):
        weight = "trainable" if train_weight else "frozen"
        title = f"rms_norm x[{args.tokens}, {args.hidden}] bf16, weight fp32 {weight}"
        print_table(title, bench(args.tokens, args.hidden, train_weight))


if __name__ == "__main__":
    main()
