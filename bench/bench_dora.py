"""DoRA training steps (issue 22's GPU item): velotune LoRA, velotune DoRA and HF transformers + PEFT DoRA
(`use_dora=True`) on one random Llama-3.1-8B-shaped checkpoint and the same token batches, r=16 on the 7
projections, bf16 or NF4 (PEFT: bitsandbytes), gradient checkpointing (`--ckpt 1`: recompute, as PEFT's runs).

Each run is a process of its own (separate peaks) and prints one `RESULT {json}` line, timed by bench_train.run:
median of `--steps` after `--warmup`, tokens/s, peak allocated memory after the optimizer exists.

  python bench/bench_dora.py make --dir /tmp/m_dora                     # once (bench/run_dora_bench.sh does it)
  python bench/bench_dora.py run --impl velotune [--dora] --dir /tmp/m_dora --quant none|nf4
  python bench/bench_dora.py run --impl peft --dora --dir /tmp/m_dora --quant none|nf4
  python bench/bench_dora.py table results.jsonl                        # markdown table and the DoRA ratios
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_train  # noqa: E402  (bench/ on the path: the step timing and velotune's model are shared)

TARGETS = bench_train.TARGETS


def peft_model(a: argparse.Namespace) -> tuple:
    """(HF model with PEFT's LoRA or DoRA, trainable parameters, fused AdamW), set up as the anchors' HF + PEFT runs
    (../shared/bench/anchor_bench.py): SDPA, bitsandbytes NF4 with double quantization, non-reentrant
    checkpointing."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kw = dict(dtype=torch.bfloat16, attn_implementation="sdpa", device_map={"": 0})
    if a.quant == "nf4":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(a.dir, **kw)
    model.config.use_cache = False
    recompute = a.ckpt != "0"
    if a.quant == "nf4":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recompute, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    elif recompute:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=a.r, lora_alpha=a.r, lora_dropout=0.0, bias="none", target_modules=TARGETS, use_dora=a.dora)
    model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, torch.optim.AdamW(params, lr=1e-4, fused=True)


def table(path: str) -> None:
    """Markdown table of the runs, then per quantization: DoRA's cost over LoRA in velotune, and velotune DoRA
    against PEFT DoRA."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    print("| impl | adapter | quant | batch x seq | checkpointing | s/step | tokens/s | peak GiB | loss step 1 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = f"| {r['impl']} | {r.get('adapter', 'lora')} | {r['quant']} | {r['bs']} x {r['seq']} "
        if r.get("ok"):
            print(
                f"{head}| {r.get('checkpointing')} | {r['step_s']} | {r['tok_s']:,} | {r['peak_gib']} "
                f"| {r['loss_first']} |"
            )
        else:
            print(f"{head}| {r.get('ckpt')} | failed: {r.get('error', '')[:80]} | | | |")
    print()
    ok = {(r["impl"], r.get("adapter", "lora"), r["quant"]): r for r in rows if r.get("ok")}
    for quant in sorted({r["quant"] for r in rows}):
        pairs = [
            ("velotune DoRA / velotune LoRA", ("velotune", "dora", quant), ("velotune", "lora", quant)),
            ("velotune DoRA / PEFT DoRA", ("velotune", "dora", quant), ("peft", "dora", quant)),
        ]
        for name, num, den in pairs:
            if num in ok and den in ok:
                speed = ok[num]["tok_s"] / ok[den]["tok_s"]
                memory = ok[num]["peak_gib"] / ok[den]["peak_gib"]
                print(f"{name} [{quant}]: speed {speed:.3f}x, memory {memory:.3f}x")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "table":
        table(sys.argv[2])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "make":
        ap = argparse.ArgumentParser()
        ap.add_argument("--dir", required=True)
        ap.add_argument("--preset", default="llama3-8b")
        a = ap.parse_args(sys.argv[2:])
        import bench_dpo

        print(json.dumps(bench_dpo.make_checkpoint(a.dir, a.preset)), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["run"])
    ap.add_argument("--impl", default="velotune", choices=["velotune", "peft"])
    bench_train.add_model_arguments(ap)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()
    a.profile = False
    build = peft_model if a.impl == "peft" else bench_train.lora_model
    bench_train.run(a, build=build, impl=a.impl)


if __name__ == "__main__":
    main()
