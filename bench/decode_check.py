"""Where decode time goes, in one device call: the NF4 GEMV against cuBLAS bf16 on Llama-3.1-8B's projection shapes
(with a sweep of its tile configs), and per-step times of velotune's engine (whole loop vs graph replay alone) for
bf16 and NF4 at a few batch sizes.

  python bench/decode_check.py --out results.jsonl          # ~3 min on an H200
  CPU check of this script: --preset tiny --device cpu --skip_kernels
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import PRESETS, build  # noqa: E402

SHAPES = {"q_o": (4096, 4096), "k_v": (1024, 4096), "gate_up": (14336, 4096), "down": (4096, 14336)}
COPIES = 8  # weights rotated so that L2 (50 MB) holds none of them between uses


def emit(out: str | None, row: dict) -> None:
    print("RESULT " + json.dumps(row), flush=True)
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")


def bench_ms(fn, reps: int = 20) -> float:
    """Median ms of fn() over reps, with events, after a warm-up."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def per_weight_ms(fn, x: torch.Tensor, weights: list, reps: int = 20) -> float:
    """Median ms of fn(x, w) per weight, over the rotated copies, replayed as one CUDA graph: launched from Python,
    each of these few-microsecond kernels would time the host's launch cost instead (seen: 42-124 us per launch)."""
    [fn(x, w) for w in weights]  # compile, warm up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        [fn(x, w) for w in weights]
    return bench_ms(graph.replay, reps) / len(weights)


def kernels(out: str | None) -> None:
    from velotune.kernels.nf4_matmul import nf4_matmul
    from velotune.quant.nf4 import quantize

    for name, (n, k) in SHAPES.items():
        torch.manual_seed(0)
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)]
        q = [quantize(w) for w in dense]
        packed_bytes = q[0].packed.numel() + q[0].absmax.numel()
        for m in (1, 8):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"kind": "kernel", "shape": name, "n": n, "k": k, "m": m}
            row["bf16_ms"] = per_weight_ms(lambda x, w: x @ w.t(), x, dense)
            row["dequant_mm_ms"] = per_weight_ms(lambda x, w: x @ w.dequantize(torch.bfloat16).t(), x, q)
            row["gemv_default_ms"] = per_weight_ms(nf4_matmul, x, q)
            sweep = {}
            configs = [(bn, nb, 4) for bn, nb in itertools.product((8, 16, 32), (1, 2, 4))]
            configs += [(32, 2, 8), (64, 2, 8)]
            for bn, nb, warps in configs:
                for split in (1, 4):
                    cfg = (bn, nb, warps, split)
                    try:
                        sweep[str(cfg)] = per_weight_ms(lambda x, w, cfg=cfg: nf4_matmul(x, w, cfg), x, q, reps=5)
                    except Exception as e:  # noqa: BLE001 (a config the compiler refuses: record, go on)
                        sweep[str(cfg)] = repr(e)[:80]
            timed = {c: t for c, t in sweep.items() if isinstance(t, float)}
            best = min(timed, key=timed.get)
            row.update(best_cfg=best, best_ms=timed[best], sweep=sweep)
            row["bf16_gbs"] = 2 * n * k / row["bf16_ms"] / 1e6
            row["gemv_best_gbs"] = packed_bytes / timed[best] / 1e6
            emit(out, {k_: v for k_, v in row.items() if k_ != "sweep"})
            with open((out or "decode_check") + ".sweep", "a") as f:
                f.write(json.dumps(row) + "\n")


def steps(a: argparse.Namespace, model, dtype: str) -> None:
    """Per-step ms of whole requests (difference of two lengths, one graph capture in each) and of graph replays."""
    from velotune.models import generate as g
    from velotune.models.decoder import StaticKVCache

    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    for batch in (1, 64) if dtype == "bf16" else (1, 8):
        prompts = torch.randint(4, min(1000, PRESETS[a.preset]["vocab_size"]), (batch, a.prompt)).tolist()
        row = {"kind": "steps", "dtype": dtype, "batch": batch, "prompt": a.prompt}
        try:
            times = {}
            for new in (2, 130, 258):
                sync()
                t = time.perf_counter()
                g.generate_batch(model, prompts, g.SamplingParams(max_new_tokens=new))
                sync()
                times[new] = time.perf_counter() - t
            row["step_ms_loop"] = 1000 * (times[258] - times[130]) / 128
            row["first_129_ms"] = 1000 * (times[130] - times[2])
            if a.device == "cuda" and g._graphs_possible(model, False, batch):
                cache = StaticKVCache.allocate(model.config, batch, a.prompt + 300, model.dtype, model.device)
                ids, mask = g._left_pad(prompts, model.device)
                g._prefill(model, cache, ids, mask, 1)
                steps_ = g._GraphSteps(model, cache)
                token = torch.zeros(batch, dtype=torch.long, device=model.device)
                pos = torch.full((batch,), a.prompt, device=model.device)
                try:
                    steps_._capture(token, pos, steps_.bucket(batch))
                except Exception:  # noqa: BLE001
                    row["capture_error"] = traceback.format_exc()[-1500:]
                    print(row["capture_error"])
                steps_(token, pos)
                if steps_.eager is None:
                    graph = next(iter(steps_.graphs.values()))[0]
                    row["step_ms_replay"] = bench_ms(graph.replay, reps=50)
                del cache, steps_
        except Exception:  # noqa: BLE001
            row["error"] = traceback.format_exc()[-1500:]
            print(row["error"])
        emit(a.out, row)
        torch.cuda.empty_cache() if a.device == "cuda" else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--skip_kernels", action="store_true")
    ap.add_argument("--skip_steps", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if not a.skip_kernels:
        kernels(a.out)
    if a.skip_steps:
        return
    hf, ours = build(a)
    del hf
    steps(a, ours, "bf16")
    from velotune.quant.apply import quantize_model

    quantize_model(ours, "nf4", compute_dtype=torch.bfloat16, progress=False)
    torch.cuda.empty_cache() if a.device == "cuda" else None
    steps(a, ours, "nf4")


if __name__ == "__main__":
    main()
