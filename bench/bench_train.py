"""One LoRA / QLoRA training step of velotune, timed the way ../shared/bench/anchor_bench.py times the anchors:
same random checkpoint, same token batches (torch.randint on a CUDA generator seeded 0), median of `steps` after
`warmup`, peak allocated memory after the optimizer exists. Prints one `RESULT {json}` line.

  python bench/bench_train.py --dir /tmp/m8b --quant none --bs 2 --seq 2048 --ckpt offload [--dora]
  python bench/bench_train.py --dir /tmp/m8b --quant fp8 --bs 2 --seq 2048 --ckpt offload   # FP8 base (load_in_fp8)
  python bench/bench_train.py table results.jsonl     # markdown table with velotune/anchor ratios
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_model(a: argparse.Namespace) -> tuple:
    """(model in train mode, trainable parameters, fused AdamW) for the bench checkpoint in a.dir: a.quant, LoRA
    (DoRA with a.dora) r=a.r on every projection, checkpointing a.ckpt over a fraction a.ckpt_layers of the
    layers."""
    import torch

    from velotune.lora.apply import get_peft_model
    from velotune.quant.loading import load_quantized

    method = None if a.quant == "none" else a.quant
    model, _ = load_quantized(a.dir, method, torch.bfloat16, "cuda", with_tokenizer=False)
    get_peft_model(model, r=a.r, lora_alpha=a.r, target_modules=TARGETS, use_dora=a.dora)
    model.gradient_checkpointing = {"0": False, "1": True, "offload": "offload"}[a.ckpt]
    model.checkpoint_layers = a.ckpt_layers
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, torch.optim.AdamW(params, lr=1e-4, fused=True)


def add_model_arguments(ap: argparse.ArgumentParser) -> None:
    """The options lora_model reads (shared by the benches that time or profile a step)."""
    ap.add_argument("--dir", required=True)
    ap.add_argument("--quant", default="none", choices=["none", "nf4", "fp8"])
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--ckpt", default="offload", choices=["0", "1", "offload"])
    ap.add_argument("--ckpt_layers", type=float, default=1.0, help="fraction of layers checkpointed")
    ap.add_argument("--dora", action="store_true", help="DoRA (use_dora) instead of plain LoRA")


def run(
    a: argparse.Namespace, build: Callable[[argparse.Namespace], tuple] = lora_model, impl: str = "velotune"
) -> None:
    """Time a.steps training steps after a.warmup of the model `build(a)` gives (model, trainable parameters,
    optimizer; called as model(ids, labels=ids)) and print its RESULT line; bench_dora.py passes PEFT's model."""
    t0 = time.time()
    keys = ("quant", "bs", "seq", "r", "ckpt", "ckpt_layers", "steps")
    rec = {"impl": impl, "adapter": "dora" if a.dora else "lora", **{k: getattr(a, k) for k in keys}}
    try:
        import torch

        model, params, opt = build(a)
        rec["checkpointing"] = getattr(model, "checkpoint_mode", {"0": "none"}.get(a.ckpt, "recompute (HF)"))
        if a.ckpt_layers < 1:
            rec["checkpointing"] = f"{model.checkpoint_mode} ({a.ckpt_layers:g} of layers)"
        rec["load_s"] = round(time.time() - t0, 1)
        rec["mem_after_load_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        rec["trainable"] = sum(p.numel() for p in params)
        vocab = model.config.vocab_size
        g = torch.Generator(device="cuda").manual_seed(0)
        torch.cuda.reset_peak_memory_stats()
        times, losses = [], []
        for i in range(a.warmup + a.steps):
            ids = torch.randint(4, vocab, (a.bs, a.seq), device="cuda", generator=g)
            torch.cuda.synchronize()
            t = time.perf_counter()
            out = model(ids, labels=ids)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            if i >= a.warmup:
                times.append(time.perf_counter() - t)
            losses.append(round(out.loss.item(), 4))
        if a.profile:
            from torch.profiler import ProfilerActivity, profile

            phases = {}
            for _ in range(2):
                marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
                marks[0].record()
                out = model(ids, labels=ids)
                marks[1].record()
                out.loss.backward()
                marks[2].record()
                opt.step()
                opt.zero_grad(set_to_none=True)
                marks[3].record()
                torch.cuda.synchronize()
                phases = {k: round(marks[i].elapsed_time(marks[i + 1]), 1) for i, k in enumerate(("fwd", "bwd", "opt"))}
            rec["phases_ms"] = phases
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                out = model(ids, labels=ids)
                out.loss.backward()
                torch.cuda.synchronize()
            print(
                prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=50), flush=True
            )
            gpu_busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
            rec["gpu_busy_ms"] = round(gpu_busy, 1)
        times.sort()
        med = times[len(times) // 2]
        rec.update(
            ok=True,
            step_s=round(med, 4),
            tok_s=round(a.bs * a.seq / med),
            peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
            reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
            loss_first=losses[0],
            loss_last=losses[-1],
        )
    except Exception as e:  # noqa: BLE001  (record the failure, keep the benchmark going)
        rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:600], tb=traceback.format_exc()[-1500:])
    rec["wall_s"] = round(time.time() - t0, 1)
    print("RESULT " + json.dumps(rec), flush=True)


def table(path: str) -> None:
    """Markdown table of results.jsonl with velotune / anchor ratios per (quant, batch, seq)."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    print("| impl | quant | batch x seq | ckpt | s/step | tokens/s | peak GiB | loss step 1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r.get("ok"):
            print(
                f"| {r['impl']} | {r['quant']} | {r['bs']} x {r['seq']} | {r.get('checkpointing', r.get('ckpt'))} "
                f"| {r['step_s']} | {r['tok_s']:,} | {r['peak_gib']} | {r['loss_first']} |"
            )
        else:
            print(
                f"| {r['impl']} | {r['quant']} | {r['bs']} x {r['seq']} | {r.get('ckpt')} | failed: "
                f"{r.get('error', '')[:80]} | | | |"
            )
    print()
    for r in rows:
        if r["impl"] != "velotune" or not r.get("ok"):
            continue
        for anchor in rows:
            # an FP8 run is compared with the 16-bit anchors and with velotune 16-bit (the same LoRA, other weights)
            quant = anchor["quant"] == r["quant"] or (r["quant"] == "fp8" and anchor["quant"] == "none")
            same = quant and all(anchor[k] == r[k] for k in ("bs", "seq"))
            other = anchor["impl"] != "velotune" or (r["quant"] == "fp8" and anchor["quant"] == "none")
            if other and same and anchor.get("ok"):
                print(
                    f"velotune({r.get('checkpointing')}) / {anchor['impl']}({anchor['quant']}) "
                    f"[{r['quant']} {r['bs']}x{r['seq']}]: "
                    f"speed {r['tok_s'] / anchor['tok_s']:.2f}x, memory {r['peak_gib'] / anchor['peak_gib']:.2f}x"
                )


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "table":
        table(sys.argv[2])
        sys.exit(0)
    ap = argparse.ArgumentParser()
    add_model_arguments(ap)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    run(ap.parse_args())
