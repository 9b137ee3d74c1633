"""DPO training steps of velotune beside TRL's DPOTrainer + PEFT (and Unsloth's patched DPOTrainer), on one random
checkpoint and the same preference pairs (issue 18's GPU item).

`make` writes a random-weight checkpoint once (transformers' LlamaForCausalLM from a config, safetensors, HF layout;
Llama-3.1-8B shapes by default) with a word-level tokenizer whose word `t<i>` is token i (i >= 4; EOS is `</s>`),
so the same pairs reach every implementation as the same token ids: velotune takes them as ids, TRL and Unsloth as
text that tokenizes back to them (checked once TRL has prepared its dataset: `ids_match`).

A pair is a 512-token prompt and two 512-token completions ending in EOS; a step trains `--pairs` pairs, chosen
and rejected in one forward, the reference being the same weights with LoRA switched off (no second model). LoRA
r=16 on the 7 projections, bf16 or NF4, AdamW, gradient clipping 1.0, constant learning rate, loss logged every
step. Each side runs its own trainer (velotune's Trainer with the DPO objective; TRL's DPOTrainer); a step's time
is the wall time between the ends of consecutive steps (data, forward, reference forward, backward, optimizer,
logging), device synchronized. Reported: median step time after warm-up, tokens/s (every token of the chosen and
rejected sequences), peak allocated memory from just before training (weights included). Each run appends one
JSON line to --out and prints `RESULT {json}`.

  python bench/bench_dpo.py make --dir /tmp/m_dpo                          # once (bench/run_dpo_bench.sh does it)
  python bench/bench_dpo.py run --impl velotune --dir /tmp/m_dpo [--nf4] --out results.jsonl
  python bench/bench_dpo.py run --impl trl --dir /tmp/m_dpo [--nf4] --out results.jsonl
  python bench/bench_dpo.py table --out results.jsonl                      # markdown table with ratios
  CPU check: add --preset tiny --device cpu (run makes the checkpoint when --dir has none).

Imports of torch and transformers stay inside functions: Unsloth must be imported before them in its process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # velotune from this checkout

PRESETS = {
    # Llama-3.1-8B shapes (= DeepSeek-R1-Distill-Llama-8B), as ../shared/bench/anchor_bench.py
    "llama3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "tiny": dict(
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=4096,
    ),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BOS, EOS, PAD, UNK = 0, 1, 2, 3  # token ids; random ids are drawn from [4, vocab)
SPECIAL = ["<s>", "</s>", "<pad>", "<unk>"]  # their words: "t1" would also match inside "t100"
MARKER = "bench_dpo.json"  # written last by make: the checkpoint is complete
FORMAT = 2  # of what make writes; a directory made by another format is made again
GIB = 2**30


# ---- the checkpoint and the pairs --------------------------------------------------------------------------------


def word(i: int) -> str:
    """Token i's word in the bench tokenizer."""
    return SPECIAL[i] if i < len(SPECIAL) else f"t{i}"


def make_checkpoint(directory: str, preset: str) -> dict:
    """Random Llama-shaped weights (seed 0, bf16) and a word-level tokenizer (`word(i)` is token i) in `directory`;
    nothing is done when it already holds this preset's checkpoint."""
    marker = Path(directory) / MARKER
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("preset") == preset and info.get("format") == FORMAT:
            return info
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    shape = PRESETS[preset]
    cfg = LlamaConfig(
        **shape,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
    )
    t0 = time.time()
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="5GB")
    params = sum(p.numel() for p in model.parameters())
    del model
    vocab = {word(i): i for i in range(shape["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL[UNK]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL[BOS],
        eos_token=SPECIAL[EOS],
        pad_token=SPECIAL[PAD],
        unk_token=SPECIAL[UNK],
    )
    fast.save_pretrained(directory)
    info = {"preset": preset, "format": FORMAT, "params": params, "make_s": round(time.time() - t0, 1)}
    marker.write_text(json.dumps(info))
    return info


def preference_pairs(n: int, vocab: int, prompt_len: int, completion_len: int, seed: int = 0) -> list[dict]:
    """n pairs of token ids: prompt [prompt_len], chosen and rejected [completion_len] each ending in EOS."""
    import torch

    g = torch.Generator().manual_seed(seed)

    def ids(k: int) -> list[int]:
        return torch.randint(4, vocab, (k,), generator=g).tolist()

    return [
        {
            "prompt_ids": ids(prompt_len),
            "chosen_ids": ids(completion_len - 1) + [EOS],
            "rejected_ids": ids(completion_len - 1) + [EOS],
        }
        for _ in range(n)
    ]


def as_text(pair: dict) -> dict:
    """The pair as TRL's prompt / chosen / rejected strings; completions start with a space (TRL concatenates
    prompt + completion) and already end in the EOS word, so TRL adds none."""
    words = lambda ids: " ".join(word(i) for i in ids)  # noqa: E731
    return {
        "prompt": words(pair["prompt_ids"]),
        "chosen": " " + words(pair["chosen_ids"]),
        "rejected": " " + words(pair["rejected_ids"]),
    }


def pair_tokens(pair: dict) -> int:
    """Tokens of the pair's two sequences, prompt + chosen and prompt + rejected."""
    return 2 * len(pair["prompt_ids"]) + len(pair["chosen_ids"]) + len(pair["rejected_ids"])


# ---- measurement -------------------------------------------------------------------------------------------------


class StepClock:
    """Wall time between the ends of consecutive steps (the first from `start`), device synchronized."""

    def __init__(self, device: str) -> None:
        self.device, self.ends, self.t0 = device, [], 0.0

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()

    def start(self) -> None:
        self.sync()
        self.t0 = time.perf_counter()

    def step_end(self) -> None:
        self.sync()
        self.ends.append(time.perf_counter())

    def times(self) -> list[float]:
        marks = [self.t0, *self.ends]
        return [b - a for a, b in zip(marks, marks[1:], strict=False)]


def reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def memory(device: str) -> dict:
    import torch

    if not device.startswith("cuda"):
        return {"peak_gib": None, "reserved_gib": None}
    return {
        "peak_gib": round(torch.cuda.max_memory_allocated() / GIB, 2),
        "reserved_gib": round(torch.cuda.max_memory_reserved() / GIB, 2),
    }


def versions() -> dict:
    out = {}
    for name in ("torch", "transformers", "peft", "accelerate", "trl", "datasets", "bitsandbytes", "unsloth"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def device_name(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


# ---- velotune ----------------------------------------------------------------------------------------------------


def run_velotune(a: argparse.Namespace, pairs: list[dict], rec: dict) -> list[float]:
    """velotune's Trainer with the DPO objective; returns the per-step losses and fills rec."""
    import torch

    from velotune.lora.apply import get_peft_model
    from velotune.quant.loading import load_quantized
    from velotune.train.callbacks import TrainerCallback
    from velotune.train.config import TrainConfig
    from velotune.train.loop import Trainer
    from velotune.train.objectives.preference import DPO

    t0 = time.time()
    model, _ = load_quantized(a.dir, "nf4" if a.nf4 else None, torch.bfloat16, a.device, with_tokenizer=False)
    get_peft_model(model, r=a.r, lora_alpha=a.r, lora_dropout=0.0, target_modules=TARGETS)
    model.gradient_checkpointing = {"0": False, "1": True, "offload": "offload"}[a.ckpt]
    rec["checkpointing"] = model.checkpoint_mode
    cfg = TrainConfig(
        learning_rate=a.lr,
        per_device_train_batch_size=a.pairs,
        max_steps=a.warmup + a.steps,
        lr_scheduler_type="constant",
        optim="adamw_torch",  # torch's fused AdamW on CUDA (train/optim.py)
        max_grad_norm=1.0,
        logging_steps=1,
        save_steps=0,
        method="dpo",
        beta=a.beta,
    )
    clock = StepClock(a.device)

    class Clock(TrainerCallback):
        def on_step_end(self, step: int, rank: int) -> None:
            clock.step_end()

    objective = DPO(beta=a.beta)
    trainer = Trainer(model, pairs, cfg, PAD, progress=False, objective=objective, callbacks=[Clock()])
    rec["load_s"] = round(time.time() - t0, 1)
    rec["trainable"] = sum(p.numel() for p in trainer.params)
    if a.device.startswith("cuda"):
        rec["mem_after_load_gib"] = round(torch.cuda.memory_allocated() / GIB, 2)
    reset_peak(a.device)
    clock.start()
    result = trainer.train()
    rec["step_times"] = [round(t, 4) for t in clock.times()]
    return [round(x, 4) for x in result.losses]


# ---- TRL and Unsloth ---------------------------------------------------------------------------------------------


def load_hf_model(a: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(model, tokenizer, PEFT config or None) for TRL (LoRA added by the trainer) or Unsloth (LoRA added here)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    seq = a.prompt_len + a.completion_len
    if a.impl == "unsloth":
        from unsloth import FastLanguageModel

        model, tok = FastLanguageModel.from_pretrained(
            model_name=a.dir, max_seq_length=seq, dtype=torch.bfloat16, load_in_4bit=a.nf4, local_files_only=True
        )
        model = FastLanguageModel.get_peft_model(
            model,
            r=a.r,
            lora_alpha=a.r,
            lora_dropout=0,
            bias="none",
            target_modules=TARGETS,
            use_gradient_checkpointing="unsloth",
            random_state=3407,
            max_seq_length=seq,
        )
        return model, tok, None
    from peft import LoraConfig

    device = torch.device(a.device)
    place = (device.index or 0) if device.type == "cuda" else a.device
    kw: dict[str, Any] = dict(dtype=torch.bfloat16, attn_implementation="sdpa", device_map={"": place})
    if a.nf4:
        from transformers import BitsAndBytesConfig

        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    model = AutoModelForCausalLM.from_pretrained(a.dir, **kw)
    tok = AutoTokenizer.from_pretrained(a.dir)
    peft = LoraConfig(
        r=a.r, lora_alpha=a.r, lora_dropout=0.0, bias="none", target_modules=TARGETS, task_type="CAUSAL_LM"
    )
    return model, tok, peft


def dpo_config(a: argparse.Namespace, output_dir: str) -> Any:
    """TRL's DPOConfig matching velotune's run: beta, max_length, batch, steps, constant lr, clipping 1.0."""
    from trl import DPOConfig

    cuda = a.device.startswith("cuda")
    kw: dict[str, Any] = dict(
        output_dir=output_dir,
        beta=a.beta,
        max_length=a.prompt_len + a.completion_len,
        per_device_train_batch_size=a.pairs,
        gradient_accumulation_steps=1,
        max_steps=a.warmup + a.steps,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=3407,
        bf16=cuda,
        use_cpu=not cuda,
    )
    if a.impl == "trl":  # Unsloth's notebooks leave it to Unsloth's own ("unsloth" checkpointing, set above)
        kw["gradient_checkpointing"] = True
    return DPOConfig(**kw)


def check_ids(dataset: Any, pairs: list[dict]) -> tuple[bool | None, int]:
    """(whether the trainer's tokenized first pair is ours, None where its dataset has no such columns; tokens per
    pair as the trainer will train them)."""
    keys = ("prompt_ids", "chosen_ids", "rejected_ids")
    first = dataset[0]
    if not all(k in first for k in keys):
        return None, pair_tokens(pairs[0])
    theirs = {k: list(first[k]) for k in keys}
    return all(theirs[k] == pairs[0][k] for k in keys), pair_tokens(theirs)


def run_hf(a: argparse.Namespace, pairs: list[dict], rec: dict) -> list[float]:
    """TRL's DPOTrainer (+ PEFT LoRA, or Unsloth's model and patched trainer); returns the per-step losses."""
    if a.impl == "unsloth":
        import unsloth

        patch = getattr(unsloth, "PatchDPOTrainer", None)  # a no-op in 2026.10 (TRL is patched on import)
        if patch is not None:
            patch()
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOTrainer

    t0 = time.time()
    model, tok, peft = load_hf_model(a)
    clock, losses = StepClock(a.device), []

    class Clock(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            reset_peak(a.device)
            clock.start()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            clock.step_end()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                losses.append(round(float(logs["loss"]), 4))

    dataset = Dataset.from_list([as_text(p) for p in pairs])
    with tempfile.TemporaryDirectory() as out:
        trainer = DPOTrainer(
            model=model,
            ref_model=None,
            args=dpo_config(a, out),
            train_dataset=dataset,
            processing_class=tok,
            peft_config=peft,
            callbacks=[Clock()],
        )
        rec["ids_match"], rec["tokens_per_pair"] = check_ids(trainer.train_dataset, pairs)
        rec["load_s"] = round(time.time() - t0, 1)
        rec["trainable"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        if a.device.startswith("cuda"):
            rec["mem_after_load_gib"] = round(torch.cuda.memory_allocated() / GIB, 2)
        trainer.train()
    rec["step_times"] = [round(t, 4) for t in clock.times()]
    return losses


# ---- one run, the table ------------------------------------------------------------------------------------------


def run(a: argparse.Namespace) -> dict:
    """One implementation's timed DPO steps; the record is printed and appended to a.out."""
    t0 = time.time()
    rec: dict[str, Any] = {
        "impl": a.impl,
        "dtype": "nf4" if a.nf4 else "bf16",
        "preset": a.preset,
        "pairs": a.pairs,
        "prompt_len": a.prompt_len,
        "completion_len": a.completion_len,
        "r": a.r,
        "beta": a.beta,
        "ckpt": a.ckpt if a.impl == "velotune" else ("unsloth" if a.impl == "unsloth" else "1"),
        "warmup": a.warmup,
        "steps": a.steps,
    }
    try:
        if a.impl == "unsloth":
            import unsloth  # noqa: F401  (before torch and transformers: it patches them, and TRL)
        info = make_checkpoint(a.dir, a.preset)
        rec["preset"] = info["preset"]
        vocab = PRESETS[info["preset"]]["vocab_size"]
        pairs = preference_pairs((a.warmup + a.steps) * a.pairs, vocab, a.prompt_len, a.completion_len)
        rec["tokens_per_pair"] = pair_tokens(pairs[0])
        losses = run_velotune(a, pairs, rec) if a.impl == "velotune" else run_hf(a, pairs, rec)
        timed = rec["step_times"][a.warmup :]
        step_s = statistics.median(timed)
        rec["tokens_per_step"] = rec["tokens_per_pair"] * a.pairs
        rec.update(
            ok=len(timed) == a.steps,
            step_s=round(step_s, 4),
            tok_s=round(rec["tokens_per_step"] / step_s),
            **memory(a.device),
            losses=losses,
        )
        if not rec["ok"]:
            rec["error"] = f"{len(rec['step_times'])} steps timed, expected {a.warmup + a.steps}"
    except Exception as e:  # noqa: BLE001  (record the failure, keep the benchmark going)
        rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:600], tb=traceback.format_exc()[-2000:])
    rec.update(
        versions=versions(),
        device=device_name(a.device),
        date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        wall_s=round(time.time() - t0, 1),
    )
    line = json.dumps(rec)
    print("RESULT " + line, flush=True)
    if a.out:
        with open(a.out, "a") as f:
            f.write(line + "\n")
    return rec


NAMES = {"velotune": "velotune", "trl": "TRL DPOTrainer + PEFT", "unsloth": "Unsloth (patched DPOTrainer)"}


def table(path: str) -> str:
    """Markdown: one row per run, then velotune / anchor ratios per dtype and issue 18's target."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    out = [
        "| implementation | dtype | pairs x (prompt + completion) | s/step | tokens/s | peak GiB | first losses |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shape = f"{r.get('pairs', '?')} x ({r.get('prompt_len', '?')} + {r.get('completion_len', '?')})"
        name = NAMES.get(r["impl"], r["impl"]) + (" (token ids differ)" if r.get("ids_match") is False else "")
        if r.get("ok"):
            losses = ", ".join(f"{x:.4f}" for x in r.get("losses", [])[:3])
            out.append(
                f"| {name} | {r['dtype']} | {shape} | {r['step_s']} | {r['tok_s']:,} | {r['peak_gib']} | {losses} ... |"
            )
        else:
            error = r.get("error", "").replace("|", "/").replace("\n", " ")[:160]
            out.append(f"| {name} | {r['dtype']} | {shape} | failed: {error} | | | |")
    out.append("")
    for r in rows:
        if r["impl"] != "velotune" or not r.get("ok"):
            continue
        for anchor in rows:
            if anchor["impl"] == "velotune" or not anchor.get("ok") or anchor["dtype"] != r["dtype"]:
                continue
            speed = r["tok_s"] / anchor["tok_s"]
            mem = r["peak_gib"] / anchor["peak_gib"] if r["peak_gib"] and anchor["peak_gib"] else float("nan")
            verdict = ""
            if anchor["impl"] == "trl":
                verdict = " (target >= 2x at <= 0.6x: " + ("met)" if speed >= 2 and mem <= 0.6 else "not met)")
            out.append(
                f"- velotune / {NAMES[anchor['impl']]}, {r['dtype']}: speed {speed:.2f}x, peak memory {mem:.2f}x"
                + verdict
            )
    for impl in NAMES:
        done = [r for r in rows if r["impl"] == impl and r.get("versions")]
        if done:
            keys = [k for k in done[0]["versions"] if impl == "unsloth" or k != "unsloth"]  # on the path, unused
            keys = keys[:2] if impl == "velotune" else keys
            shown = ", ".join(f"{k} {done[0]['versions'][k]}" for k in keys if k in done[0]["versions"])
            out.append(f"- {NAMES[impl]} runs: {shown}")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cmd", choices=["make", "run", "table"])
    ap.add_argument("--dir", default="/tmp/m_dpo", help="the random checkpoint (made when missing)")
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--impl", default="velotune", choices=sorted(NAMES))
    ap.add_argument("--nf4", action="store_true", help="NF4 base weights (QLoRA); bf16 otherwise")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--pairs", type=int, default=2, help="pairs per step (per_device_train_batch_size)")
    ap.add_argument("--prompt_len", type=int, default=512)
    ap.add_argument("--completion_len", type=int, default=512)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--ckpt", default="offload", choices=["0", "1", "offload"], help="velotune's checkpointing")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=None, help="results.jsonl: run appends to it, table reads it")
    return ap.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    if args.cmd == "make":
        print(json.dumps(make_checkpoint(args.dir, args.preset)), flush=True)
    elif args.cmd == "table":
        print(table(args.out))
    else:
        run(args)
