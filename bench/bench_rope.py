"""Rotary embedding of q and k, forward + backward, at Llama-3.1-8B shapes: Triton vs the reference (CUDA).

q and k are the decoder's [B, T, H, D] projection outputs viewed as [B, H, T, D].
python bench/bench_rope.py [--tokens 4096 --heads 32 --kv-heads 8 --head-dim 128]
"""

from __future__ import annotations

import argparse

import torch
from _timing import measure, print_table, require_cuda

from velotune.kernels.rope import apply_rope, rope_reference
from velotune.models.rope import rope_tables


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    args = p.parse_args()
    require_cuda()
    t, d = args.tokens, args.head_dim
    q = torch.randn(1, t, args.heads, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    k = torch.randn(1, t, args.kv_heads, d, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    inv_freq = 1.0 / 500000 ** (torch.arange(0, d, 2, device="cuda").float() / d)
    cos, sin = rope_tables(inv_freq, torch.arange(t, device="cuda")[None], torch.bfloat16)
    dq, dk = torch.randn_like(q), torch.randn_like(k)

    def reference() -> tuple[torch.Tensor, torch.Tensor]:
        return rope_reference(q, cos, sin), rope_reference(k, cos, sin)

    def backward(out: tuple[torch.Tensor, torch.Tensor]) -> None:
        torch.autograd.grad(out, (q, k), (dq, dk))

    results = [
        measure("reference (torch)", reference, backward),
        measure("triton", lambda: apply_rope(q, k, cos, sin), backward),
    ]
    print_table(f"rope q[1, {args.heads}, {t}, {d}] k[1, {args.kv_heads}, {t}, {d}] bf16", results)


if __name__ == "__main__":
    main()
