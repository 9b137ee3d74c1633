"""Linear + cross-entropy forward + backward at Llama-3.1-8B shapes (CUDA): logits materialised in fp32, the
chunked PyTorch step, and the chunked Triton step. The head weight is frozen, as in LoRA training.

python bench/bench_cross_entropy.py [--tokens 4096 --hidden 4096 --vocab 128256 --chunk 4096]
"""

from __future__ import annotations

import argparse

import torch
from _timing import measure, print_table, require_cuda

from velotune.kernels.cross_entropy import LinearCrossEntropyFunction, linear_cross_entropy_reference


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--softcap", type=float, default=None)
    args = p.parse_args()
    require_cuda()
    hidden = torch.randn(args.tokens, args.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = 0.02 * torch.randn(args.vocab, args.hidden, device="cuda", dtype=torch.bfloat16)
    targets = torch.randint(0, args.vocab, (args.tokens,), device="cuda")

    def backward(loss: torch.Tensor) -> None:
        torch.autograd.grad(loss, hidden)

    def chunked(fused: bool):
        return lambda: LinearCrossEntropyFunction.apply(hidden, weight, targets, args.softcap, args.chunk, fused)

    results = [
        measure(
            "materialised logits (torch)",
            lambda: linear_cross_entropy_reference(hidden, weight, targets, args.softcap),
            backward,
        ),
        measure(f"chunked {args.chunk}, torch step", chunked(False), backward),
        measure(f"chunked {args.chunk}, triton step", chunked(True), backward),
    ]
    title = f"linear_cross_entropy hidden[{args.tokens}, {args.hidden}] x weight[{args.vocab}, {args.hidden}] bf16"
    print_table(title + (f", softcap {args.softcap}" if args.softcap else ""), results)


if __name__ == "__main__":
    main()
