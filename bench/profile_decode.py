"""Where a decode step's GPU time goes: the CUDA kernels of velotune's eager decode steps (no CUDA graph, so the
profiler sees each kernel) for the bench_generate model, next to the graph-replayed step time.

  python bench/profile_decode.py --batch 1 --dtype bf16        # prints the top kernels per step and a JSON line
  CPU check of this script: --preset tiny --device cpu
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_generate import PRESETS, build  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "nf4"])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    from velotune.models.generate import SamplingParams, generate_batch

    hf, ours = build(a)
    del hf
    if a.dtype == "nf4":
        from velotune.quant.apply import quantize_model

        quantize_model(ours, "nf4")
        ours.quantization = "nf4"
    torch.cuda.empty_cache() if a.device == "cuda" else None
    prompts = torch.randint(4, min(1000, PRESETS[a.preset]["vocab_size"]), (a.batch, a.prompt)).tolist()
    params = SamplingParams(max_new_tokens=a.steps + 1)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    row = {"dtype": a.dtype, "batch": a.batch, "prompt": a.prompt}
    for graphs in (True, False):
        generate_batch(ours, prompts, SamplingParams(max_new_tokens=2), cuda_graphs=graphs)  # warm-up
        times = []
        for new in (1, a.steps + 1):
            sync()
            t = time.perf_counter()
            generate_batch(ours, prompts, SamplingParams(max_new_tokens=new), cuda_graphs=graphs)
            sync()
            times.append(time.perf_counter() - t)
        row[f"step_ms_{'graph' if graphs else 'eager'}"] = 1000 * (times[1] - times[0]) / a.steps
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if a.device == "cuda" else [])
    key = "cuda_time_total" if a.device == "cuda" else "cpu_time_total"
    for graphs in (False, True):
        with profile(activities=acts) as prof:
            generate_batch(ours, prompts, params, cuda_graphs=graphs)
            sync()
        averages = prof.key_averages()
        if not graphs:
            print(averages.table(sort_by=key, row_limit=22, max_name_column_width=70))
        total = sum(e.self_device_time_total for e in averages) / 1000 if a.device == "cuda" else 0.0
        # prefill included once: an upper bound per step
        row[f"kernel_ms_per_step_{'graph' if graphs else 'eager'}"] = total / (a.steps + 1)
    print("RESULT " + json.dumps(row))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
