"""Generation throughput of velotune's engine beside transformers' generate (static cache) on the same weights.

Issue 19's GPU table: a random Llama-3.1-8B-shaped model (transformers' LlamaForCausalLM from a config; velotune's
decoder shares its tensors), bf16 and NF4 (velotune's quantizer; transformers through bitsandbytes' Linear4bit on
the same bf16 weights when bitsandbytes imports), prompts of 512 random tokens, 512 new tokens with EOS ignored,
greedy, batch 1, 16, 64 and 256. Per run:

- new_tokens_per_s: batch x new tokens / wall time of the whole request (prefill, CUDA-graph captures included);
- decode_tokens_per_s: batch x (new - 1) / (request time - time of the same request with 1 new token);
- peak_gib: this model's weights + the request's peak allocation above what was allocated before it;
- fraction_of_bound: decode steps/s over bandwidth / bytes read per decode step (the weights other than the
  embedding table, plus the KV cache at the request's average length): how close decoding is to reading memory.

A warm-up request of 4 new tokens precedes each measured one (transformers compiles its static-cache decode step
there unless --hf_compile off; that time is reported as warmup_s). Each run appends one JSON line to --out.

  python bench/bench_generate.py --dtypes bf16 --out results.jsonl      # ~4 min on an H200
  python bench/bench_generate.py --dtypes nf4 --out results.jsonl
  python bench/bench_generate.py table results.jsonl                    # markdown table with velotune / HF ratios
  CPU check of this script: --preset tiny --device cpu --prompt 16 --new 8 --batches 1,4
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

GIB = 2**30
PRESETS = {
    "llama3-8b": dict(  # meta-llama/Llama-3.1-8B config.json
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
}


def build(a: argparse.Namespace) -> tuple[nn.Module, nn.Module]:
    """(transformers model, velotune model) on the same bf16 tensors, random weights seeded 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from velotune.models.families import family_for
    from velotune.models.load import build_empty, load_weights

    config = LlamaConfig(**PRESETS[a.preset])
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(a.device):
            hf = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default)
    hf.generation_config.eos_token_id = None  # EOS ignored: every request writes all its new tokens
    hf.generation_config.pad_token_id = 0
    ours = build_empty(family_for("llama").from_hf(config.to_dict()))
    load_weights(ours, hf.state_dict().items(), "bench", torch.bfloat16, a.device)  # same device/dtype: shared
    ours.to(a.device)  # the rope buffers (parameters are there already: still shared)
    return hf, ours.eval()


def hf_to_nf4(hf: nn.Module) -> None:
    """transformers' model with bitsandbytes NF4 linears (double-quantized, bf16 compute) from its bf16 weights, in
    place; the LM head stays bf16 as in velotune."""
    import bitsandbytes as bnb

    for module in list(hf.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name != "lm_head":
                q = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4"
                )
                q.weight = bnb.nn.Params4bit(
                    child.weight.data.cpu(), requires_grad=False, compress_statistics=True, quant_type="nf4"
                )
                setattr(module, name, q.to(child.weight.device))


def weight_bytes(model: nn.Module) -> int:
    """Bytes a decode step reads of the weights: every parameter and buffer but the embedding table (a step reads
    one row per sequence) and the rope tables."""
    seen, total = set(), 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if "embed_tokens" in name or "inv_freq" in name or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def own_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in model.state_dict().values()}.values())


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def request(impl: str, model: nn.Module, prompts: torch.Tensor, new: int, a: argparse.Namespace) -> float:
    """Seconds for one greedy request of `new` tokens per prompt."""
    from velotune.models.generate import SamplingParams, generate_batch

    sync(a.device)
    start = time.perf_counter()
    if impl == "velotune":
        done = generate_batch(model, prompts.tolist(), SamplingParams(max_new_tokens=new))
        assert all(len(c.tokens) == new for c in done)
    else:
        ids = prompts.to(a.device)
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            do_sample=False,
            cache_implementation="static",
            disable_compile=a.hf_compile == "off",
        )
        assert out.shape[1] == ids.shape[1] + new
    sync(a.device)
    return time.perf_counter() - start


def run_one(impl: str, dtype: str, model: nn.Module, ours: nn.Module, batch: int, a: argparse.Namespace) -> dict:
    cfg = ours.config
    rec = {"impl": impl, "dtype": dtype, "batch": batch, "prompt": a.prompt, "new": a.new, "preset": a.preset}
    if impl == "hf":
        rec["hf_compile"] = a.hf_compile
    try:
        prompts = torch.randint(4, cfg.vocab_size, (batch, a.prompt), generator=torch.Generator().manual_seed(batch))
        t0 = time.perf_counter()
        request(impl, model, prompts, 4, a)
        rec["warmup_s"] = round(time.perf_counter() - t0, 2)
        prefill = request(impl, model, prompts, 1, a)
        if a.device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        total = request(impl, model, prompts, a.new, a)
        if a.device == "cuda":
            rec["peak_gib"] = round((torch.cuda.max_memory_allocated() - before + own_bytes(model)) / GIB, 2)
        decode_steps_per_s = (a.new - 1) / (total - prefill)
        kv_per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2  # bf16 keys and values
        step_bytes = weight_bytes(ours) + batch * (a.prompt + a.new / 2) * kv_per_token
        rec.update(
            total_s=round(total, 3),
            prefill_s=round(prefill, 3),
            new_tokens_per_s=round(batch * a.new / total, 1),
            decode_tokens_per_s=round(batch * decode_steps_per_s, 1),
            bytes_per_step_gib=round(step_bytes / GIB, 2),
            fraction_of_bound=round(decode_steps_per_s / (a.bandwidth_gbs * 1e9 / step_bytes), 3),
        )
    except Exception as exc:  # a failed run is a row of the table, not the end of the bench
        rec["error"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    if a.device == "cuda":
        torch.cuda.empty_cache()
    return rec


def environment(a: argparse.Namespace) -> dict:
    versions = {p: metadata.version(p) for p in ("torch", "transformers") if _installed(p)}
    if _installed("bitsandbytes"):
        versions["bitsandbytes"] = metadata.version("bitsandbytes")
    gpu = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "gpu": gpu, "versions": versions}


def _installed(package: str) -> bool:
    try:
        metadata.version(package)
    except metadata.PackageNotFoundError:
        return False
    return True


def bench(a: argparse.Namespace) -> None:
    start = time.perf_counter()
    env = environment(a)
    hf, ours = build(a)
    batches = [int(b) for b in a.batches.split(",")]
    with open(a.out, "a") as out:
        for dtype in a.dtypes.split(","):
            models = {"velotune": ours, "hf": hf}
            if dtype == "nf4":
                from velotune.quant.apply import quantize_model

                quantize_model(ours, "nf4", compute_dtype=torch.bfloat16, progress=False)
                try:
                    hf_to_nf4(hf)
                except Exception as exc:  # no bitsandbytes: velotune's rows alone
                    print(f"transformers NF4 skipped: {type(exc).__name__}: {exc}", flush=True)
                    models.pop("hf")
            for batch in batches:
                for impl in a.impls.split(","):
                    if impl not in models:
                        continue
                    if time.perf_counter() - start > a.deadline:
                        rec = {"impl": impl, "dtype": dtype, "batch": batch, "skipped": "past --deadline"}
                    else:
                        rec = run_one(impl, dtype, models[impl], ours, batch, a)
                    rec.update(env)
                    print("RESULT " + json.dumps(rec), flush=True)
                    out.write(json.dumps(rec) + "\n")
                    out.flush()


def table(path: str) -> str:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    key = {(r["impl"], r["dtype"], r["batch"]): r for r in rows}
    lines = [
        "| dtype | batch | velotune new tok/s | decode tok/s | peak GiB | of bound | HF new tok/s | HF peak GiB | "
        "velotune / HF |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for dtype, batch in sorted({(r["dtype"], r["batch"]) for r in rows}, key=lambda k: (k[0], k[1])):
        v, h = key.get(("velotune", dtype, batch), {}), key.get(("hf", dtype, batch), {})
        ratio = v.get("new_tokens_per_s", 0) / h["new_tokens_per_s"] if h.get("new_tokens_per_s") else None
        cells = [
            dtype,
            batch,
            v.get("new_tokens_per_s", v.get("error", v.get("skipped", "-"))),
            v.get("decode_tokens_per_s", "-"),
            v.get("peak_gib", "-"),
            v.get("fraction_of_bound", "-"),
            h.get("new_tokens_per_s", h.get("error", h.get("skipped", "-"))),
            h.get("peak_gib", "-"),
            f"{ratio:.2f}x" if ratio else "-",
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "table":
        print(table(sys.argv[2]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results.jsonl")
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtypes", default="bf16,nf4", help="bf16 and/or nf4, in this order (nf4 quantizes in place)")
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--impls", default="velotune,hf")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--new", type=int, default=512)
    ap.add_argument("--hf_compile", default="auto", choices=["auto", "off"], help="transformers' static-cache compile")
    ap.add_argument("--bandwidth_gbs", type=float, default=4800.0, help="GPU memory bandwidth (H200: 4.8 TB/s)")
    ap.add_argument("--deadline", type=float, default=540.0, help="seconds after which no run starts")
    bench(ap.parse_args())


if __name__ == "__main__":
    main()
