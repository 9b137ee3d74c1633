"""GPU tensors that take an op's PyTorch reference instead of its fused kernel say so, once per op and reason; CPU
tensors, for which the reference is the path, say nothing."""

from __future__ import annotations

import logging

import pytest
import torch

from velotune.kernels import _triton, glu, rms_norm, rope


class _OnGPU:
    is_cuda = True


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(_triton, "_NOTICED", set())


def test_notice_is_said_once_per_op_and_reason(caplog):
    with caplog.at_level(logging.WARNING, logger="velotune.kernels"):
        for _ in range(3):
            _triton.reference_notice("RoPE", "an odd number (3) of rotated channels", _OnGPU())
        _triton.reference_notice("RoPE", "the position tables require gradients", _OnGPU())
        _triton.reference_notice("RMSNorm", "anything", torch.zeros(2))  # CPU: the reference is the path
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "velotune: RoPE runs its PyTorch reference on the GPU (an odd number (3) of rotated channels): same "
        "results, slower",
        "velotune: RoPE runs its PyTorch reference on the GPU (the position tables require gradients): same "
        "results, slower",
    ]


def _recorder(monkeypatch, module):
    calls = []
    monkeypatch.setattr(module, "reference_notice", lambda op, why, *t: calls.append((op, why)))
    return calls


def test_each_fallback_names_its_op_and_reason(monkeypatch):
    calls = _recorder(monkeypatch, rope)
    x = torch.randn(1, 2, 4, 6)
    cos = sin = torch.randn(1, 4, 3)  # 3 rotated channels: odd, the kernel needs pairs
    rope.apply_rope(x, x, cos, sin)
    assert calls and calls[0][0] == "RoPE"
    calls = _recorder(monkeypatch, rms_norm)
    rms_norm.rms_norm(torch.randn(2, 8), torch.ones(8), 1e-6)
    assert calls and calls[0][0] == "RMSNorm"
    calls = _recorder(monkeypatch, glu)
    glu.swiglu(torch.randn(2, 8), torch.randn(2, 8))
    assert calls and calls[0][0] == "gated activation (SwiGLU/GeGLU)"
