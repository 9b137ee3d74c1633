"""SwiGLU and GeGLU forward + backward at Llama-3.1-8B shapes: Triton vs the PyTorch references (CUDA).

python bench/bench_swiglu.py [--tokens 4096 --intermediate 14336]
"""

from __future__ import annotations

import argparse

import torch
from _timing import measure, print_table, require_cuda

from velotune.kernels.glu import geglu, geglu_reference, swiglu, swiglu_reference


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    args = p.parse_args()
    require_cuda()
    shape = (args.tokens, args.intermediate)
    gate = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    up = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dh = torch.randn_like(gate)

    def backward(out: torch.Tensor) -> None:
        torch.autograd.grad(out, (gate, up), dh)

    for name, fused, reference in (("swiglu", swiglu, swiglu_reference), ("geglu", geglu, geglu_reference)):
        results = [
            measure("reference (torch)", lambda f=reference: f(gate, up), backward),
            measure("triton", lambda f=fused: f(gate, up), backward),
        ]
        print_table(f"{name} gate/up[{args.tokens}, {args.intermediate}] bf16", results)


if __name__ == "__main__":
    main()
