"""Soft-capped attention (Gemma 2) through FlexAttention on CUDA against the explicit reference: output and
gradients of q, k, v, causal and with boolean masks (packing, sliding window), grouped-query heads."""

from __future__ import annotations

import pytest
import torch

from velotune.kernels.attention import attention_reference, flex_attention, softcap_attention_flex

CASES = [  # (batch, q heads, kv heads, seq, head dim)
    (2, 4, 2, 256, 64),
    (1, 8, 8, 384, 128),
    (2, 4, 1, 200, 256),
]


def _mask(kind: str, b: int, t: int) -> torch.Tensor | None:
    if kind == "causal":
        return None
    i = torch.arange(t, device="cuda")
    base = i[None, :] <= i[:, None]
    if kind == "window":
        base &= i[:, None] - i[None, :] < 64
    else:  # two packed documents per row, split at different points
        doc = torch.stack([(i >= t // 3).long(), (i >= t // 2).long()])[:b]
        base = base & (doc[:, :, None] == doc[:, None, :])
    return base.expand(b, t, t)[:, None] if base.dim() == 2 else base[:, None]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or flex_attention is None, reason="FlexAttention needs CUDA")
@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize("kind", ["causal", "window", "packed"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_flex_softcap_matches_reference(shape, kind, dtype):
    b, hq, hk, t, d = shape
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        (torch.randn(b, h, t, d, device="cuda", generator=g) * 2).to(dtype).requires_grad_() for h in (hq, hk, hk)
    )
    mask = _mask(kind, b, t)
    causal = mask is None
    scale, cap = 224**-0.5, 50.0 if d != 128 else 5.0
    out = softcap_attention_flex(q, k, v, mask, causal, scale, cap)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    exact = _reference(q, k, v, dout, mask, causal, scale, cap, torch.float64)
    # the reference in the test dtype bounds what rounding alone costs; FlexAttention may not do much worse
    same_dtype = _reference(q, k, v, dout, mask, causal, scale, cap, dtype)
    for name, ours, ref, theirs in zip(("out", "dq", "dk", "dv"), (out, *grads), same_dtype, exact, strict=True):
        err = (ours.double() - theirs).abs().max().item()
        ref_err = (ref.double() - theirs).abs().max().item()
        scale_ = theirs.abs().max().item()
        assert err <= 2 * ref_err + 1e-5 * scale_, f"{name}: max error {err:.3g}, reference in {dtype}: {ref_err:.3g}"


def _reference(q, k, v, dout, mask, causal, scale, cap, dtype):
    q_, k_, v_ = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out = attention_reference(q_, k_, v_, mask, causal, scale, cap)
    return (out, *torch.autograd.grad(out, (q_, k_, v_), dout.to(dtype)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or flex_attention is None, reason="FlexAttention needs CUDA")
def test_flex_softcap_new_lengths_compile_once_per_bucket():
    """Training batches padded to their longest row change length every step: FlexAttention compiles one kernel
    per length bucket, not per length (dynamo gives up after its recompile limit and runs unfused eager attention),
    and padding changes neither the output nor the gradients."""
    from torch._dynamo.utils import counters

    from velotune.kernels.attention import FLEX_LENGTH_MULTIPLE

    g = torch.Generator(device="cuda").manual_seed(1)
    seen, late = set(), []
    for t in range(96, 96 + 14 * 40, 40):  # 14 lengths, 5 buckets
        q, k, v = (
            torch.randn(1, h, t, 64, device="cuda", generator=g, dtype=torch.bfloat16).requires_grad_()
            for h in (4, 2, 2)
        )
        before = counters["frames"]["ok"]
        out = softcap_attention_flex(q, k, v, None, True, 0.125, 30.0)
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        bucket = -(-t // FLEX_LENGTH_MULTIPLE)
        if bucket in seen:
            late.append((t, counters["frames"]["ok"] - before))
        seen.add(bucket)
        exact = _reference(q, k, v, dout, None, True, 0.125, 30.0, torch.float64)
        for name, ours, theirs in zip(("out", "dq", "dk", "dv"), (out, *grads), exact, strict=True):
            err = (ours.double() - theirs).abs().max().item()
            assert err < 3e-2 * theirs.abs().max().item(), f"length {t}, {name}: max error {err:.3g}"
    assert all(n == 0 for _, n in late), f"(length, frames compiled) in buckets already compiled: {late}"


def test_flex_kernel_options_env_override(monkeypatch):
    from velotune.env import FLEX_OPTIONS as FLEX_OPTIONS_ENV
    from velotune.kernels.attention import flex_kernel_options

    assert flex_kernel_options(256, torch.device("cpu")) is None
    monkeypatch.setenv(FLEX_OPTIONS_ENV, '{"BLOCK_M": 64}')
    assert flex_kernel_options(256, torch.device("cpu")) == {"BLOCK_M": 64}


@pytest.mark.parametrize("groups", [1, 4])
def test_decode_attention_matches_reference(groups):
    """The decode-step attention (grouped query heads as matmul rows) equals the reference on a masked cache."""
    from velotune.kernels.attention import attention_reference, decode_attention

    torch.manual_seed(0)
    b, hk, tk, d = 3, 2, 37, 16
    q = torch.randn(b, hk * groups, 1, d, dtype=torch.float64)
    k, v = torch.randn(b, hk, tk, d, dtype=torch.float64), torch.randn(b, hk, tk, d, dtype=torch.float64)
    mask = torch.rand(b, 1, 1, tk) > 0.3
    mask[:, :, :, -1] = True  # every row attends to at least its own slot
    got = decode_attention(q, k, v, mask, 0.25)
    torch.testing.assert_close(got, attention_reference(q, k, v, mask, False, 0.25).to(got.dtype))
