"""RMSNorm: y = x / rms(x) * (offset + w), computed in fp32.

offset is 0 for Llama-style norms and 1 for Gemma's (1 + w). This file holds the PyTorch reference, which is also
the CPU path; a Triton kernel for CUDA goes beside it.
"""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * (offset + weight.float())).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMSNorm over the last dimension of x [..., H] with weight [H]."""
    return rms_norm_reference(x, weight, eps, offset)
