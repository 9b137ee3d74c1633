"""velotune's own training loop vs transformers.Trainer driving the same velotune model, on the same batches.

W1 shapes (a local HF checkpoint, e.g. the Llama-3.1-8B-shaped random one `anchor_bench.py make` writes), LoRA
r=16 on the seven projections, gradient checkpointing as chosen, AdamW (fused) at a constant learning rate with
gradient clipping 1.0 in both. The batches are random token ids drawn once (CUDA generator seeded 0) and fed in
the same order to both (Trainer reads them as an iterable dataset, which it does not shuffle); both start from
the same LoRA weights. Step time is the median of `steps` after `warmup`, synchronised around each optimizer step
(a TrainerCallback on the Trainer side). Prints one `RESULT {json}` line with tokens/s of both, their ratio, peak
memory and the first losses.

  python bench/bench_hf_trainer.py --dir /tmp/m8b --quant nf4 --bs 2 --seq 2048 --ckpt offload
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batches(vocab: int, a: argparse.Namespace) -> list:
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    n = a.warmup + a.steps
    return [torch.randint(4, vocab, (a.bs, a.seq), device="cuda", generator=g).cpu() for _ in range(n)]


def _median(times: list[float]) -> float:
    times = sorted(times)
    return times[len(times) // 2]


def run_plain(model, batches: list, a: argparse.Namespace) -> dict:
    """bench_train.py's loop plus gradient clipping, as Trainer does it."""
    import torch

    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=a.lr, weight_decay=0.0, fused=True)
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i, ids in enumerate(batches):
        ids = ids.cuda()
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.model(ids, labels=ids)  # velotune's CausalLM, as bench_train.py calls it
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t)
        losses.append(round(out.loss.item(), 4))
    step = _median(times)
    return {
        "step_s": round(step, 4),
        "tok_s": round(a.bs * a.seq / step),
        "losses": losses,
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }


def run_trainer(model, batches: list, a: argparse.Namespace) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.t = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            torch.cuda.synchronize()
            if state.global_step > a.warmup:
                self.times.append(time.perf_counter() - self.t)

    class Rows(torch.utils.data.IterableDataset):
        """The rows in the order the plain loop saw them (an iterable dataset has no sampler to reorder it)."""

        def __iter__(self):
            return iter([{"input_ids": row} for ids in batches for row in ids])

    def collate(features: list[dict]) -> dict:
        ids = torch.stack([f["input_ids"] for f in features])
        return {"input_ids": ids, "labels": ids}

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out,
            per_device_train_batch_size=a.bs,
            gradient_accumulation_steps=1,
            max_steps=len(batches),
            learning_rate=a.lr,
            lr_scheduler_type="constant",
            optim="adamw_torch_fused",
            weight_decay=0.0,
            max_grad_norm=1.0,
            bf16=True,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_pin_memory=True,
        )
        timer = StepTimer()
        trainer = Trainer(model=model, args=args, train_dataset=Rows(), data_collator=collate, callbacks=[timer])
        torch.cuda.reset_peak_memory_stats()
        trainer.train()
    step = _median(timer.times)
    losses = [round(h["loss"], 4) for h in trainer.state.log_history if "loss" in h]
    return {
        "step_s": round(step, 4),
        "tok_s": round(a.bs * a.seq / step),
        "losses": losses,
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }


def run(a: argparse.Namespace) -> None:
    t0 = time.time()
    rec = {"bench": "hf_trainer", **{k: getattr(a, k) for k in ("quant", "bs", "seq", "r", "ckpt", "steps")}}
    try:
        import torch

        from velotune.compat import FastLanguageModel

        model, _ = FastLanguageModel.from_pretrained(
            a.dir, load_in_4bit=a.quant == "nf4", dtype=torch.bfloat16, device_map="cuda"
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=a.r,
            lora_alpha=a.r,
            target_modules=TARGETS,
            use_gradient_checkpointing={"0": False, "1": True, "offload": "unsloth"}[a.ckpt],
        )
        rec["load_s"] = round(time.time() - t0, 1)
        initial = copy.deepcopy({k: v for k, v in model.state_dict().items() if "lora_" in k})
        batches = _batches(model.config.vocab_size, a)
        plain = run_plain(model, batches, a)
        model.load_state_dict(initial, strict=False)  # same starting adapters for the Trainer run
        torch.cuda.empty_cache()
        hf = run_trainer(model, batches, a)
        n = min(len(plain["losses"]), len(hf["losses"]), 3)
        diff = max(abs(x - y) for x, y in zip(plain["losses"][:n], hf["losses"][:n], strict=True))
        rec.update(
            ok=True,
            velotune_loop=plain,
            hf_trainer=hf,
            speed_ratio_trainer_over_loop=round(hf["tok_s"] / plain["tok_s"], 3),
            first_losses_max_abs_diff=round(diff, 5),
        )
    except Exception as e:  # noqa: BLE001  (record the failure, keep the benchmark going)
        rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:600], tb=traceback.format_exc()[-1500:])
    rec["wall_s"] = round(time.time() - t0, 1)
    print("RESULT " + json.dumps(rec), flush=True)
    if rec.get("ok"):
        print(
            f"velotune loop {rec['velotune_loop']['tok_s']:,} tok/s, transformers.Trainer "
            f"{rec['hf_trainer']['tok_s']:,} tok/s: Trainer/loop = {rec['speed_ratio_trainer_over_loop']:.3f}; "
            f"first losses loop {rec['velotune_loop']['losses'][:3]} vs Trainer {rec['hf_trainer']['losses'][:3]}",
            flush=True,
        )


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True, help="local Hugging Face checkpoint directory (W1: Llama-3.1-8B shapes)")
    ap.add_argument("--quant", default="none", choices=["none", "nf4"])
    ap.add_argument("--bs", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--ckpt", default="offload", choices=["0", "1", "offload"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-4)
    run(ap.parse_args())
