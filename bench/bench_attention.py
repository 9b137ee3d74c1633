"""Soft-capped attention at Gemma-2-9B's shapes (2 x 2048, 16 query / 8 kv heads, head dim 256, cap 50):
FlexAttention under torch.compile (default mode, optionally max-autotune) and with explicit block sizes, beside
SDPA without the cap (the cuDNN/flash ceiling). Prints forward and forward+backward ms and TFLOP/s (causal: half
the square). Each variant compiles once (~20-40 s; max-autotune ~2 min).

  python bench/bench_attention.py [--modes default max-autotune-no-cudagraphs] [--no-variants]
"""

from __future__ import annotations

import argparse
import time

import _timing  # noqa: F401  (puts the repo root on sys.path)
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


# Tiles to try for head dim 256: forward BLOCK_M/N; backward BLOCK_M1/N1 (dK/dV) and BLOCK_M2/N2 (dQ). Keys with a
# fwd_ / bwd_ prefix apply to that pass only. The first is the unprefixed 128/64 tile measured best on 2026-11-23.
def _fwd(m, n, w, s, **kw):
    return {"fwd_BLOCK_M": m, "fwd_BLOCK_N": n, "fwd_num_warps": w, "fwd_num_stages": s, **kw}


def _bwd(m1, n1, m2, n2, w, s):
    return {
        "bwd_BLOCK_M1": m1,
        "bwd_BLOCK_N1": n1,
        "bwd_BLOCK_M2": m2,
        "bwd_BLOCK_N2": n2,
        "bwd_num_warps": w,
        "bwd_num_stages": s,
    }


BASE_BWD = _bwd(64, 64, 64, 64, 8, 2)
BASE_FWD = _fwd(128, 64, 8, 2)
VARIANTS = [
    {
        "BLOCK_M": 128,
        "BLOCK_N": 64,
        "num_warps": 8,
        "num_stages": 2,
        "BLOCK_M1": 64,
        "BLOCK_N1": 64,
        "BLOCK_M2": 64,
        "BLOCK_N2": 64,
    },
    {**BASE_FWD, **BASE_BWD},
    {**_fwd(128, 32, 8, 3), **BASE_BWD},
    {**_fwd(128, 64, 8, 3), **BASE_BWD},
    {**_fwd(128, 64, 8, 2, fwd_USE_TMA=True), **BASE_BWD},
    {**BASE_FWD, **_bwd(32, 128, 128, 32, 8, 2)},
    {**BASE_FWD, **_bwd(64, 128, 128, 64, 8, 1)},
    {**BASE_FWD, **_bwd(64, 64, 64, 64, 8, 1)},
    {**BASE_FWD, **_bwd(64, 64, 64, 64, 4, 2)},
    {**BASE_FWD, **_bwd(32, 128, 128, 32, 8, 1)},
    {**BASE_FWD, **_bwd(32, 64, 64, 32, 4, 2)},
    {**BASE_FWD, **_bwd(64, 128, 128, 64, 8, 2)},
]


def timed(fn, reps: int = 10) -> float:
    fn()
    torch.cuda.synchronize()
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", nargs="+", default=["default"])
    ap.add_argument("--no-variants", action="store_true", help="skip the explicit block-size variants")
    a = ap.parse_args()
    torch._dynamo.config.recompile_limit = 64  # one compile per variant; the default 8 sent later variants to eager
    b, hq, hk, t, d, cap = 2, 16, 8, 2048, 256, 50.0
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, h, t, d, device="cuda", generator=g, dtype=torch.bfloat16) for h in (hq, hk, hk))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    dout = torch.randn_like(q)
    flops = 4 * b * hq * t * t * d / 2
    bm = create_block_mask(lambda bi, h, qi, ki: ki <= qi, None, None, t, t, device="cuda")

    def score_mod(score, bi, h, qi, ki):
        return cap * torch.tanh(score / cap)

    def report(name, fn):  # timed as soon as it exists, so a call cut short still reports what it reached
        fwd = timed(lambda: fn())
        both = timed(lambda: torch.autograd.grad(fn(), (q, k, v), dout))
        print(
            f"{name:40s} fwd {fwd:6.2f} ms ({flops / fwd / 1e9:5.0f} TFLOP/s)  fwd+bwd {both:6.2f} ms "
            f"({3.5 * flops / both / 1e9:5.0f} TFLOP/s)",
            flush=True,
        )

    report("sdpa (no cap)", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    for mode in a.modes:
        t0 = time.time()
        fn = torch.compile(flex_attention, dynamic=False, mode=None if mode == "default" else mode)
        out = fn(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=True)
        out.backward(dout)
        print(f"compile {mode}: {time.time() - t0:.0f} s", flush=True)
        report(f"flex {mode}", lambda fn=fn: fn(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=True))
    fn = torch.compile(flex_attention, dynamic=False)
    for options in [] if a.no_variants else VARIANTS:

        def call(fn=fn, options=options):
            return fn(q, k, v, score_mod=score_mod, block_mask=bm, enable_gqa=True, kernel_options=options)

        try:
            t0 = time.time()
            call().backward(dout)
            print(f"compile {options}: {time.time() - t0:.0f} s", flush=True)
            report(f"flex {options}", call)
        except Exception as e:  # noqa: BLE001  (a variant the hardware cannot hold: report it, try the next)
            print(f"flex {options}: {type(e).__name__}: {str(e)[:160]}", flush=True)


if __name__ == "__main__":
    main()
