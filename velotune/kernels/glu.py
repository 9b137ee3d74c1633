"""Gated MLP activations: SwiGLU silu(g) * u (Llama, Qwen, Mistral, Phi-3) and GeGLU gelu_tanh(g) * u (Gemma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def geglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh") * up


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return swiglu_reference(gate, up)


def geglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return geglu_reference(gate, up)


GATED_ACTIVATIONS = {"silu": swiglu, "gelu_tanh": geglu}
