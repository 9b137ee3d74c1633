"""Linear + cross-entropy forward + backward at Llama-3.1-8B shapes (CUDA): logits materialised in fp32, the
chunked PyTorch step, and the chunked Triton step; then the per-token log-probabilities (DPO/ORPO/GRPO) the same
three ways, with a different incoming gradient per token. The head weight is frozen, as in LoRA training, unless
--train-head (full fine-tuning: the log-probabilities then run the chunks again in backward for its gradient).

python bench/bench_cross_entropy.py [--tokens 4096 --hidden 4096 --vocab 128256 --chunk 4096 --train-head]
"""

from __future__ import annotations

import argparse

import torch
from _timing import measure, print_table, require_cuda

from velotune.kernels.cross_entropy import (
    LinearCrossEntropyFunction,
    LinearTokenLogpsFunction,
    linear_cross_entropy_reference,
    linear_token_logps_reference,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--softcap", type=float, default=None)
    p.add_argument("--train-head", action="store_true", help="the head weight requires grad (full fine-tuning)")
    args = p.parse_args()
    require_cuda()
    hidden = torch.randn(args.tokens, args.hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = 0.02 * torch.randn(args.vocab, args.hidden, device="cuda", dtype=torch.bfloat16)
    weight.requires_grad_(args.train_head)
    targets = torch.randint(0, args.vocab, (args.tokens,), device="cuda")
    token_grads = torch.randn(args.tokens, device="cuda")  # d objective / d logp_i, as DPO's differ per token
    inputs = [hidden, weight] if args.train_head else [hidden]

    def backward(out: torch.Tensor) -> None:
        torch.autograd.grad(out, inputs, grad_outputs=token_grads if out.dim() else None)

    def chunked(fused: bool, function=LinearCrossEntropyFunction):
        return lambda: function.apply(hidden, weight, targets, args.softcap, args.chunk, fused)

    results = [
        measure(
            "materialised logits (torch)",
            lambda: linear_cross_entropy_reference(hidden, weight, targets, args.softcap),
            backward,
        ),
        measure(f"chunked {args.chunk}, torch step", chunked(False), backward),
        measure(f"chunked {args.chunk}, triton step", chunked(True), backward),
        measure(
            "token logps, materialised (torch)",
            lambda: linear_token_logps_reference(hidden, weight, targets, args.softcap),
            backward,
        ),
        measure(f"token logps, chunked {args.chunk}, torch", chunked(False, LinearTokenLogpsFunction), backward),
        measure(f"token logps, chunked {args.chunk}, triton", chunked(True, LinearTokenLogpsFunction), backward),
    ]
    title = f"linear_cross_entropy hidden[{args.tokens}, {args.hidden}] x weight[{args.vocab}, {args.hidden}] bf16"
    title += f", softcap {args.softcap}" if args.softcap else ""
    print_table(title + (", head trains" if args.train_head else ", head frozen"), results)


if __name__ == "__main__":
    main()
