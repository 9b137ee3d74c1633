"""Memory planner vs measurement (CUDA): for each configuration, the planner's predicted peak and the peak that
torch.cuda.max_memory_allocated() reports over 2 LoRA training steps (r=16, all projections, fused AdamW) of an
8B-shaped model, with the error in %. A configuration that runs out of memory is reported as OOM, beside whether
the planner said it would fit.

  python bench/bench_planner.py make --dir /tmp/m8b                 # random Llama-3-8B-shaped checkpoint (~16 GB)
  python bench/bench_planner.py run --dir /tmp/m8b                  # all configurations, bf16 and NF4
  python bench/bench_planner.py run --dir /tmp/m8b --quant nf4 --sizes 1x512,4x2048 --ckpt 1,offload
  python bench/bench_planner.py oom --dir /tmp/m8b                  # out-of-memory recovery and auto_batch_size

Each measurement prints a `RESULT {json}` line as it finishes, then the whole table (markdown) at the end.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,
)
TINY = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=4096,
)
SIZES = "1x512,8x512,1x2048,4x2048,8x2048,1x8192,2x8192,1x16384"
CKPT = {"0": False, "1": True, "offload": "offload"}
POLICY = {"0": None, "1": "checkpoint", "offload": "offload"}


def make(a: argparse.Namespace) -> None:
    """A random bf16 Llama-3-8B-shaped checkpoint in Hugging Face layout (velotune's own decoder names)."""
    import torch
    from safetensors.torch import save_file

    from velotune.models.families import family_for
    from velotune.models.load import build_empty

    out = Path(a.dir)
    out.mkdir(parents=True, exist_ok=True)
    shapes = LLAMA3_8B | (TINY if a.preset == "tiny" else {})
    hf = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16", **shapes}
    model = build_empty(family_for("llama").from_hf(hf))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=device).manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    index: dict[str, str] = {}
    files = 0

    def flush() -> None:
        nonlocal shard, files
        files += 1
        name = f"model-{files:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        index.update({k: name for k in shard})
        shard = {}

    for name, p in model.state_dict().items():
        t = torch.ones(p.shape) if name.endswith("norm.weight") else None
        if t is None:
            t = torch.randn(p.shape, generator=g, device=device, dtype=torch.bfloat16).mul_(0.02).cpu()
        shard[name] = t.to(torch.bfloat16).contiguous()
        if sum(v.numel() * 2 for v in shard.values()) > 4 * 2**30:
            flush()
    if shard:
        flush()
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    (out / "config.json").write_text(json.dumps(hf, indent=1))
    print(json.dumps({"made": str(out), "files": files}), flush=True)


def _load(dir_: str, quant: str, device: str = "cuda"):
    import torch

    from velotune.lora.apply import get_peft_model
    from velotune.quant.loading import load_quantized

    model, _ = load_quantized(dir_, None if quant == "none" else quant, torch.bfloat16, device, with_tokenizer=False)
    get_peft_model(model, r=16, lora_alpha=16)
    model.train()
    return model


def _measure(model, bs: int, seq: int, ckpt: str) -> tuple[int | None, float]:
    """(peak allocated bytes over 2 training steps, or None on OOM; seconds)."""
    import torch

    from velotune.train.oom import free_memory, is_out_of_memory

    model.gradient_checkpointing = CKPT[ckpt]
    params = [p for p in model.parameters() if p.requires_grad]
    free_memory()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    g = torch.Generator(device="cuda").manual_seed(0)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    peak = None
    try:
        for _ in range(2):
            ids = torch.randint(4, model.config.vocab_size, (bs, seq), device="cuda", generator=g)
            model(ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    except RuntimeError as exc:
        if not is_out_of_memory(exc):
            raise
    opt.zero_grad(set_to_none=True)
    del opt
    free_memory()
    return peak, time.perf_counter() - t0


def run(a: argparse.Namespace) -> None:
    import torch

    from velotune.train.memory import GiB, Setting, estimate, usable_bytes

    capacity = torch.cuda.get_device_properties(0).total_memory
    gpu = torch.cuda.get_device_name(0)
    rows = []
    for quant in a.quant.split(","):
        t0 = time.time()
        model = _load(a.dir, quant)
        print(f"loaded {quant} in {time.time() - t0:.0f} s", flush=True)
        for size in a.sizes.split(","):
            bs, seq = (int(x) for x in size.split("x"))
            for ckpt in a.ckpt.split(","):
                setting = Setting(
                    micro_batch=bs,
                    seq_len=seq,
                    checkpointing=POLICY[ckpt],
                    quantization=None if quant == "none" else quant,
                )
                predicted = estimate(model.config, setting)
                peak, seconds = _measure(model, bs, seq, ckpt)
                rec = {
                    "gpu": gpu,
                    "quant": quant,
                    "bs": bs,
                    "seq": seq,
                    "ckpt": POLICY[ckpt] or "none",
                    "predicted_gib": round(predicted.total / GiB, 2),
                    "measured_gib": round(peak / GiB, 2) if peak else None,
                    "error_pct": round(100 * (predicted.total / peak - 1), 1) if peak else None,
                    "planner_says_fits": predicted.total <= usable_bytes(capacity),
                    "parts_gib": {k: round(v / GiB, 3) for k, v in predicted.parts.items()},
                    "s": round(seconds, 1),
                }
                rows.append(rec)
                print("RESULT " + json.dumps(rec), flush=True)
        del model
        torch.cuda.empty_cache()
    _table(rows, capacity)


def _table(rows: list[dict], capacity: int) -> None:
    from velotune.train.memory import GiB, usable_bytes

    gpu = rows[0]["gpu"] if rows else "?"
    print(f"\nGPU {gpu}, {capacity / GiB:.1f} GiB (~{usable_bytes(capacity) / GiB:.1f} usable)")
    print("| quant | batch x seq | checkpointing | predicted GiB | measured GiB | error % | planner: fits? |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        measured = r["measured_gib"] if r["measured_gib"] is not None else "OOM"
        error = r["error_pct"] if r["error_pct"] is not None else ("agrees" if not r["planner_says_fits"] else "WRONG")
        print(
            f"| {r['quant']} | {r['bs']} x {r['seq']} | {r['ckpt']} | {r['predicted_gib']} | {measured} | {error} "
            f"| {'yes' if r['planner_says_fits'] else 'no'} |"
        )
    errors = [abs(r["error_pct"]) for r in rows if r["error_pct"] is not None]
    if errors:
        print(f"\nmean |error| {sum(errors) / len(errors):.1f}%, worst {max(errors):.1f}% over {len(errors)} runs")


def oom(a: argparse.Namespace) -> None:
    """A real CUDA out-of-memory in velotune's Trainer: micro-batch a.bs without checkpointing, recovered by
    halving; the same steps again at the micro-batch it settled on; then auto_batch_size's choice."""
    import torch

    from velotune.train.config import TrainConfig
    from velotune.train.loop import Trainer
    from velotune.train.oom import free_memory

    model = _load(a.dir, a.quant, a.device)
    model.gradient_checkpointing = False
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(4, model.config.vocab_size, (a.seq,), generator=g).tolist() for _ in range(a.bs * a.steps)]
    examples = [{"input_ids": ids, "labels": ids, "row": f"random:{i}"} for i, ids in enumerate(rows)]

    def trainer(bs: int, acc: int) -> Trainer:
        free_memory()  # the previous trainer's optimizer states
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad:
                    p.copy_(start[n])
        cfg = TrainConfig(
            per_device_train_batch_size=bs, gradient_accumulation_steps=acc, max_steps=a.steps, save_steps=0
        )
        return Trainer(model, examples, cfg, pad_id=0, progress=False)

    t = time.time()
    first = trainer(a.bs, 1).train()
    print(f"recovered run: {first.steps} steps in {time.time() - t:.0f} s; out-of-memory events: {first.oom_events}")
    print(f"  micro-batch {first.micro_batch_size} x accumulation {first.accumulation}; losses {first.losses}")
    again = trainer(first.micro_batch_size, first.accumulation).train()
    worst = max(abs(x - y) for x, y in zip(first.losses, again.losses, strict=True))
    print(f"same steps at micro-batch {first.micro_batch_size} from the start: losses {again.losses}")
    print(f"  max |loss difference| {worst:.2e} (bf16; the step that ran out of memory was retried from scratch)")
    probe = trainer(a.bs, 1)
    print(probe.auto_micro_batch())
    print("RESULT " + json.dumps({"oom_events": first.oom_events, "max_loss_diff": worst, "ok": math.isfinite(worst)}))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("--dir", required=True)
    m.add_argument("--preset", default="llama3-8b", choices=["llama3-8b", "tiny"])
    r = sub.add_parser("run")
    r.add_argument("--dir", required=True)
    r.add_argument("--quant", default="none,nf4", help="comma list of none, nf4")
    r.add_argument("--sizes", default=SIZES, help="comma list of BATCHxSEQ")
    r.add_argument("--ckpt", default="0,1,offload", help="comma list of 0 (none), 1 (recompute), offload")
    o = sub.add_parser("oom")
    o.add_argument("--dir", required=True)
    o.add_argument("--quant", default="none")
    o.add_argument("--bs", type=int, default=16)
    o.add_argument("--seq", type=int, default=4096)
    o.add_argument("--steps", type=int, default=3)
    o.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (no memory limit, no OOM)")
    args = ap.parse_args()
    {"make": make, "run": run, "oom": oom}[args.cmd](args)
