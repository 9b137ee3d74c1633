"""Chunked linear cross-entropy and per-token log-probabilities: the Triton per-chunk step and the PyTorch step
against materialised logits."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.compare import assert_matches, grads
from velotune.kernels.cross_entropy import (
    IGNORE_INDEX,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    linear_token_logps,
    linear_token_logps_reference,
)

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


# (tokens, hidden, vocab, chunk) for log-probabilities: odd sizes, chunks smaller than, equal to and beyond N
LOGPS_CASES = [(37, 24, 131, 8), (37, 16, 131, 37), (20, 32, 1000, 7), (5, 8, 7, 2), (1, 8, 7, 4096)]
# (hidden, weight) requiring grad: LoRA (frozen head), full fine-tuning, a trainable head alone, evaluation
TRAINS = [(True, False), (True, True), (False, True), (False, False)]


def _logps_inputs(n, h, v, dtype, device, trains):
    torch.manual_seed(0)
    hidden = torch.randn(n, h, device=device).to(dtype).requires_grad_(trains[0])
    weight = (0.5 * torch.randn(v, h, device=device)).to(dtype).requires_grad_(trains[1])
    targets = torch.randint(0, v, (n,), device=device)
    targets[1::4] = IGNORE_INDEX
    return hidden, weight, targets


def _objective(logps: torch.Tensor) -> torch.Tensor:
    """A non-linear function of the log-probabilities, so each token's incoming gradient differs (as in DPO)."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(logps.shape[0], generator=g).to(logps.device)
    return torch.sigmoid(logps * w).sum()


def _check_logps(hidden, weight, targets, softcap, chunk, dtype):
    got = linear_token_logps(hidden, weight, targets, softcap, chunk)
    ref = linear_token_logps_reference(hidden, weight, targets, softcap)
    assert got.dtype == torch.float32 and got.shape == targets.shape
    assert_matches(got, ref, dtype)
    assert (got[targets == IGNORE_INDEX] == 0).all()
    if hidden.requires_grad or weight.requires_grad:
        for mine, want in zip(
            grads(_objective(got), hidden, weight), grads(_objective(ref), hidden, weight), strict=True
        ):
            if want is None:
                assert mine is None
            else:
                assert_matches(mine, want, dtype)
    with torch.no_grad():
        assert_matches(linear_token_logps(hidden, weight, targets, softcap, chunk), ref.detach(), dtype)


@pytest.mark.parametrize("trains", TRAINS, ids=["hidden", "both", "weight", "neither"])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("case", LOGPS_CASES)
def test_token_logps_match_log_softmax_of_materialised_logits(case, softcap, trains):
    n, h, v, chunk = case
    _check_logps(*_logps_inputs(n, h, v, torch.float32, "cpu", trains), softcap, chunk, torch.float32)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("case", LOGPS_CASES[:3])
def test_token_logps_bf16_match_materialised_logits(case, softcap):
    n, h, v, chunk = case
    _check_logps(*_logps_inputs(n, h, v, torch.bfloat16, "cpu", (True, True)), softcap, chunk, torch.bfloat16)


def test_token_logps_of_ignored_only_rows_are_zero_with_zero_gradient():
    hidden, weight, targets = _logps_inputs(6, 8, 11, torch.float32, "cpu", (True, True))
    targets.fill_(IGNORE_INDEX)
    logps = linear_token_logps(hidden, weight, targets, chunk_size=4)
    assert (logps == 0).all()
    gh, gw = torch.autograd.grad(_objective(logps), (hidden, weight))
    assert (gh == 0).all() and (gw == 0).all()
    empty = linear_token_logps(hidden[:0], weight, targets[:0], chunk_size=4)
    assert empty.shape == (0,)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_minus_summed_logps_is_the_chunked_loss(softcap):
    hidden, weight, targets = _logps_inputs(37, 16, 131, torch.float32, "cpu", (True, True))
    from_logps = -linear_token_logps(hidden, weight, targets, softcap, 8).sum()
    loss = linear_cross_entropy(hidden, weight, targets, softcap, 8)
    assert_matches(from_logps, loss)
    for a, b in zip(grads(from_logps, hidden, weight), grads(loss, hidden, weight), strict=True):
        assert_matches(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("trains", TRAINS[:3], ids=["hidden", "both", "weight"])
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", LOGPS_CASES + CASES[1:3])
def test_triton_token_logps_match_materialised_logits(triton_device, case, dtype, softcap, trains):
    n, h, v, chunk = case
    _check_logps(*_logps_inputs(n, h, v, dtype, triton_device, trains), softcap, chunk, dtype)
