"""Chunked linear cross-entropy: the Triton per-chunk step and the PyTorch step against materialised logits."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.compare import assert_matches, grads
from velotune.kernels.cross_entropy import IGNORE_INDEX, linear_cross_entropy, linear_cross_entropy_reference

# (tokens, hidden, vocab, chunk): several chunks with a short last one, a vocab that is not a multiple of the block
CASES = [(37, 64, 1000, 16), (20, 32, 5003, 8), (9, 16, 9000, 4), (1, 8, 7, 4096)]


def _inputs(n, h, v, dtype, device, train_weight):
    torch.manual_seed(0)
    hidden = torch.randn(n, h, device=device, dtype=dtype, requires_grad=True)
    weight = (0.3 * torch.randn(v, h, device=device)).to(dtype).requires_grad_(train_weight)
    targets = torch.randint(0, v, (n,), device=device)
    targets[::5] = IGNORE_INDEX
    return hidden, weight, targets


def _check(hidden, weight, targets, softcap, chunk, dtype):
    loss = linear_cross_entropy(hidden, weight, targets, softcap, chunk)
    ref = linear_cross_entropy_reference(hidden, weight, targets, softcap)
    assert_matches(loss, ref, dtype)
    for got, want in zip(grads(0.5 * loss, hidden, weight), grads(0.5 * ref, hidden, weight), strict=True):
        if want is None:
            assert got is None
        else:
            assert_matches(got, want, dtype)
    with torch.no_grad():
        assert_matches(linear_cross_entropy(hidden, weight, targets, softcap, chunk), ref.detach(), dtype)


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("case", CASES)
def test_chunked_torch_path_matches_materialised_logits(case, softcap):
    n, h, v, chunk = case
    _check(*_inputs(n, h, v, torch.float32, "cpu", True), softcap, chunk, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("train_weight", [False, True])
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_materialised_logits(triton_device, case, dtype, softcap, train_weight):
    n, h, v, chunk = case
    _check(*_inputs(n, h, v, dtype, triton_device, train_weight), softcap, chunk, dtype)
