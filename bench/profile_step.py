"""Where a training step's time goes: GPU busy vs idle, the idle gaps and which host op launched the kernel
after each gap, and kernel time by kind. Profiles one LoRA step (after warm-up) of the bench checkpoint.

  python bench/profile_step.py --dir /tmp/m_llama3-8b --quant none --ckpt offload --trace $OUT/trace.json.gz
  python bench/profile_step.py analyze trace.json.gz     # the same report from a saved trace
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _kind(name: str) -> str:
    n = name.lower()
    for key, label in (
        ("gemm", "gemm"),
        ("cutlass", "gemm"),
        ("nvjet", "gemm"),
        ("sm90_xmma", "gemm"),
        ("flash", "attention"),
        ("fmha", "attention"),
        ("cudnn", "attention"),
        ("_rms", "rms_norm"),
        ("_rope", "rope"),
        ("_glu", "glu"),
        ("_chunk_loss", "cross_entropy"),
        ("nf4", "nf4"),
        ("memcpy", "memcpy"),
        ("adam", "optimizer"),
        ("copy", "copy/cast"),
        ("elementwise", "elementwise"),
        ("reduce", "reduce"),
    ):
        if key in n:
            return label
    return "other"


def analyze(trace_path: str, top: int = 25) -> dict:
    """Print and return the GPU-idle report of a chrome trace written by torch.profiler."""
    opener = gzip.open if trace_path.endswith(".gz") else open
    with opener(trace_path, "rt") as f:
        events = json.load(f)["traceEvents"]
    gpu = sorted(
        (e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
        key=lambda e: e["ts"],
    )
    runtime = {
        e["args"]["correlation"]: e
        for e in events
        if e.get("ph") == "X" and e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})
    }
    cpu_ops = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"), key=lambda e: e["ts"])
    starts = [e["ts"] for e in cpu_ops]

    def launcher(kernel: dict) -> str:
        """The innermost and outermost CPU ops around the launch of `kernel`."""
        rt = runtime.get(kernel.get("args", {}).get("correlation"))
        if rt is None:
            return "?"
        import bisect

        i = bisect.bisect_right(starts, rt["ts"])
        inner, outer = None, None
        for e in reversed(cpu_ops[max(0, i - 400) : i]):
            if e["ts"] + e["dur"] >= rt["ts"]:
                inner = inner or e["name"]
                outer = e["name"]
        return f"{outer} > {inner}" if inner else "?"

    span = gpu[-1]["ts"] + gpu[-1]["dur"] - gpu[0]["ts"]
    busy = 0.0
    end = gpu[0]["ts"]
    gaps = []
    by_kind: collections.Counter = collections.Counter()
    count_kind: collections.Counter = collections.Counter()
    for prev, e in zip([None, *gpu[:-1]], gpu, strict=True):
        start = max(e["ts"], end)
        busy += max(0.0, e["ts"] + e["dur"] - start)
        if prev is not None and e["ts"] > end:
            gaps.append((e["ts"] - end, prev["name"], e["name"], e))
        end = max(end, e["ts"] + e["dur"])
        by_kind[_kind(e["name"])] += e["dur"]
        count_kind[_kind(e["name"])] += 1
    idle = sum(g[0] for g in gaps)
    small = sum(g[0] for g in gaps if g[0] < 20)
    print(f"kernels {len(gpu)}  span {span / 1e3:.1f} ms  busy {busy / 1e3:.1f} ms  idle {idle / 1e3:.1f} ms")
    print(f"idle in gaps < 20 us: {small / 1e3:.1f} ms over {sum(1 for g in gaps if g[0] < 20)} gaps")
    print("kernel time by kind (ms, count):")
    for k, v in by_kind.most_common():
        print(f"  {k:14s} {v / 1e3:8.1f} {count_kind[k]:6d}")
    by_launcher: collections.Counter = collections.Counter()
    for g in gaps:
        if g[0] >= 20:
            by_launcher[launcher(g[3])] += g[0]
    print("idle (gaps >= 20 us) by the host op that launched the next kernel (ms):")
    for k, v in by_launcher.most_common(top):
        print(f"  {v / 1e3:8.2f}  {k[:150]}")
    print(f"largest {top} gaps:")
    for g in sorted(gaps, key=lambda g: -g[0])[:top]:
        print(f"  {g[0] / 1e3:7.2f} ms  after {g[1][:50]!r}  before {g[2][:50]!r}  launched by {launcher(g[3])[:90]}")
    return {"span_ms": span / 1e3, "busy_ms": busy / 1e3, "idle_ms": idle / 1e3, "kernels": len(gpu)}


def profile(a: argparse.Namespace) -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.bench_train import lora_model

    model, _, opt = lora_model(a)
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(4, model.config.vocab_size, (a.bs, a.seq), device="cuda", generator=g)

    def step() -> None:
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        step()
        torch.cuda.synchronize()
    raw = a.trace[:-3] if a.trace.endswith(".gz") else a.trace
    prof.export_chrome_trace(raw)
    if a.trace.endswith(".gz"):
        with open(raw, "rb") as src, gzip.open(a.trace, "wb", compresslevel=6) as dst:
            dst.write(src.read())
        Path(raw).unlink()
    analyze(a.trace)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "analyze":
        analyze(sys.argv[2])
        sys.exit(0)
    from bench.bench_train import add_model_arguments

    ap = argparse.ArgumentParser()
    add_model_arguments(ap)
    ap.add_argument("--trace", default="/tmp/trace.json.gz")
    profile(ap.parse_args())
