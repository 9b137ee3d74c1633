"""Document-masked attention (packed rows, sliding windows, soft-caps) against the explicit reference with a dense
[T x T] mask: outputs and q/k/v gradients in fp32, per-document split on CPU and FlexAttention on CUDA."""

from __future__ import annotations

import pytest
import torch

from velotune.kernels.attention import (
    Documents,
    attention_reference,
    dense_document_attention,
    document_attention,
    document_attention_split,
    flex_attention,
    flex_document_attention,
)

ROWS = [[0, 10, 30, 37], [0, 37], [0, 1, 2, 20, 37]]  # document starts per row, then T (a 1-token document too)


def _documents(rows: list[list[int]], device: str) -> Documents:
    t = rows[0][-1]
    ids = torch.zeros(len(rows), t, dtype=torch.int32, device=device)
    for b, starts in enumerate(rows):
        for d, (s, e) in enumerate(zip(starts, starts[1:], strict=False)):
            ids[b, s:e] = d
    return Documents(ids, len(rows), t)


def _dense(docs: Documents, window: int | None) -> torch.Tensor:
    i = torch.arange(docs.length, device=docs.ids.device)
    keep = (i[None, :] <= i[:, None]) & (docs.ids[:, :, None] == docs.ids[:, None, :])  # [B, T, T]
    if window is not None:
        keep &= i[:, None] - i[None, :] < window
    return keep[:, None]  # [B, 1, T, T]


def _inputs(b: int, t: int, device: str, dtype=torch.float32):
    g = torch.Generator(device=device).manual_seed(0)
    return [(torch.randn(b, h, t, 16, device=device, generator=g)).to(dtype).requires_grad_() for h in (4, 2, 2)]


def _check(fn, docs, window, softcap, device, rtol=1e-5, atol=1e-5):
    q, k, v = _inputs(docs.batch, docs.length, device)
    out = fn(q, k, v, docs, window, 0.25, softcap)
    dout = torch.randn(out.shape, device=device, generator=torch.Generator(device=device).manual_seed(1))
    grads = torch.autograd.grad(out, (q, k, v), dout)
    q_, k_, v_ = (x.detach().requires_grad_() for x in (q, k, v))
    ref = attention_reference(q_, k_, v_, _dense(docs, window), False, 0.25, softcap)
    ref_grads = torch.autograd.grad(ref, (q_, k_, v_), dout)
    for name, ours, theirs in zip(("out", "dq", "dk", "dv"), (out, *grads), (ref, *ref_grads), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("window", [None, 5, 16])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_split_equals_dense_reference(window, softcap):
    _check(document_attention_split, _documents(ROWS, "cpu"), window, softcap, "cpu")


@pytest.mark.parametrize("window", [None, 5])
def test_dense_mask_path_equals_dense_reference(window):
    """CUDA's path for rows of up to DENSE_MASK_MAX_TOKENS (SDPA with the documents' [T x T] mask), run on CPU."""
    _check(
        lambda q, k, v, d, w, s, c: dense_document_attention(q, k, v, d, w, s),
        _documents(ROWS, "cpu"),
        window,
        None,
        "cpu",
    )


def test_rows_sharing_boundaries_run_together():
    _check(document_attention_split, _documents([ROWS[0]] * 2, "cpu"), 5, 2.0, "cpu")


def test_cpu_dispatch_is_the_split_and_reads_bounds_once():
    docs = _documents(ROWS, "cpu")
    assert docs.bounds == ROWS
    _check(document_attention, docs, 5, None, "cpu")


def test_one_document_per_row_is_plain_causal():
    q, k, v = _inputs(2, 21, "cpu")
    out = document_attention(q, k, v, None, None, 0.25)
    ref = attention_reference(q, k, v, None, True, 0.25)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(flex_attention is None, reason="needs torch >= 2.5 (FlexAttention)")
@pytest.mark.parametrize(("rows", "window", "softcap"), [(ROWS, 5, 2.0), (None, None, None)], ids=["packed", "causal"])
def test_flex_block_mask_logic_on_cpu(rows, window, softcap):
    """The CUDA path's block mask and score_mod, run eagerly on CPU (forward only: no CPU backward in FlexAttention)."""
    docs = _documents(rows or [[0, 37]] * 3, "cpu")
    q, k, v = (x.detach() for x in _inputs(3, 37, "cpu"))
    out = flex_document_attention(q, k, v, docs if rows else None, window, 0.25, softcap, compiled=False)
    ref = attention_reference(q, k, v, _dense(docs, window), False, 0.25, softcap)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert rows is None or list(docs.block_masks) == [window]  # built once per forward, kept for the other layers


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or flex_attention is None, reason="FlexAttention needs CUDA")
@pytest.mark.parametrize("window", [None, 5, 16])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_flex_equals_dense_reference(window, softcap):
    _check(flex_document_attention, _documents(ROWS, "cuda"), window, softcap, "cuda", rtol=1e-4, atol=1e-5)
