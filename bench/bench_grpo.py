"""GRPO training steps of velotune beside TRL's GRPOTrainer + PEFT (generation by transformers, no vLLM), on the
random Llama-3.1-8B-shaped checkpoint that bench_dpo.py makes (its word `t<i>` is token i, so both sides get the
same prompt ids: velotune as ids, TRL as text that tokenizes back to them, checked: `ids_match`).

A step: --prompts prompts (1) of --prompt_len random tokens (256), --generations completions each (8) sampled at
temperature 1 to exactly --completion tokens (EOS ignored: velotune's objective sees a tokenizer without stop tokens,
TRL gets min_new_tokens = the completion length), scored by a deterministic reward (a hash of each completion's
tokens, so advantages are not zero), then one optimizer step of the dapo loss with beta 0 (no reference pass). LoRA
r=16, alpha 32 on the 7 projections, NF4 base (--bf16: bf16), gradient checkpointing, AdamW, constant learning rate,
clipping 1.0, --micro_batch rows per forward (8: the group in one forward; less: gradient accumulation), the same
on both sides. Each side runs its own trainer: velotune's Trainer with its GRPO objective, TRL's GRPOTrainer. A
step's time is the wall time between the ends of consecutive steps (device synchronized), split into generation
(sampling and rewards: GRPO.prepare_step, GRPOTrainer._generate_and_score_completions, timed by subclasses here) and
training (the rest: forward, backward, optimizer). Reported: medians over the steps after the first (warm-up),
completion tokens/s, peak allocated memory from just before training (weights, KV cache and activations).

Each run appends one JSON line to --out and prints `RESULT {json}`, also when it runs out of memory ({"oom": true})
or past --time_limit ({"timeout": true}: the steps done, and where the unfinished one was; for TRL the tokens its
generation had reached, from which its generation time is estimated).

--longest (velotune): for each of --lengths in turn until one does not fit, generation at full size (the KV cache
of the group's prompt + L tokens allocated, decoding timed at both ends of it, the step's generation time
estimated from the two rates) and one real optimizer step on random completions of L tokens (the training half of
the step, timed); the record says what was run. A real step at these lengths would decode for many minutes.

  python bench/bench_grpo.py make --dir /tmp/m_dpo                    # once (bench/run_grpo_bench.sh does it)
  python bench/bench_grpo.py run --impl velotune --completion 1024 --steps 3 --out results.jsonl
  python bench/bench_grpo.py run --impl trl --completion 1024 --steps 3 --out results.jsonl
  python bench/bench_grpo.py run --impl velotune --longest --micro_batch 1 --out results.jsonl
  python bench/bench_grpo.py table --out results.jsonl                # markdown table with ratios
  CPU check: add --preset tiny --device cpu --completion 32 --prompt_len 16 (run makes the checkpoint when missing).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench_dpo import (
    PAD,
    PRESETS,
    TARGETS,
    device_name,
    load_hf_model,
    make_checkpoint,
    memory,
    reset_peak,
    versions,
    word,
)

SEED = 3407
LENGTHS = "8192,16384,20480,32768"


# ---- prompts and the reward --------------------------------------------------------------------------------------


def prompt_examples(n: int, vocab: int, prompt_len: int, seed: int = 0) -> list[dict]:
    """n prompts of random token ids as velotune's prompt rows (data/prompts.py), with their text for TRL."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(4, vocab, (prompt_len,), generator=g).tolist()
        out.append(
            {"prompt_ids": ids, "prompt": " ".join(word(t) for t in ids), "columns": {}, "row": f"bench:{i + 1}"}
        )
    return out


def bench_reward(completions: list, completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
    """Rewards in [0, 1) from a hash of each completion's first 64 token ids: deterministic, different within a
    group (advantages are not zero), free to compute. TRL's reward signature, which velotune's objective also uses."""
    return [(sum(ids[:64]) * 2654435761 % 2**32) / 2**32 for ids in completion_ids]


class NoStopTokenizer:
    """The bench tokenizer as velotune's GRPO objective sees it, without stop tokens: no EOS id and an empty
    vocabulary (no end-of-turn words), so `stop_token_ids` is empty and every completion runs to
    max_completion_length, as TRL's do with min_new_tokens. Decoding is the real tokenizer's."""

    eos_token_id = None
    pad_token_id = PAD

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def get_vocab(self) -> dict[str, int]:
        return {}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


# ---- measurement -------------------------------------------------------------------------------------------------


class Steps:
    """Each step's seconds as it ends (wall time since the previous step's end, its generation, the rest:
    training; device synchronized) and where the step under way is, so a run stopped at its time limit reports."""

    def __init__(self, device: str) -> None:
        self.device, self.done = device, []
        self.phase, self.t_step, self.t_gen, self.gen_s, self.forwards = "loading", 0.0, 0.0, 0.0, 0

    def _now(self) -> float:
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self) -> None:
        """Just before the first step: peak memory counts from here."""
        reset_peak(self.device)
        self.t_step, self.phase = self._now(), "step"

    def generation_start(self) -> None:
        self.t_gen, self.phase, self.forwards = self._now(), "generation", 0

    def generation_end(self) -> None:
        self.gen_s, self.phase = self._now() - self.t_gen, "training"

    def forward(self) -> None:
        """A forward hook on the LM head: during generation, one call per decode step (a token for every row)."""
        if self.phase == "generation":
            self.forwards += 1

    def step_end(self) -> None:
        t = self._now()
        step_s = t - self.t_step
        self.done.append(
            {
                "step_s": round(step_s, 3),
                "generation_s": round(self.gen_s, 3),
                "training_s": round(step_s - self.gen_s, 3),
            }
        )
        self.t_step, self.gen_s, self.phase = t, 0.0, "step"

    def unfinished(self, completion_len: int) -> dict:
        """The step under way (no device sync: the device may be busy for minutes)."""
        now = time.perf_counter()
        out: dict[str, Any] = {"phase": self.phase, "step_elapsed_s": round(now - self.t_step, 1)}
        if self.phase == "generation":
            out["generation_elapsed_s"] = round(now - self.t_gen, 1)
            if self.forwards:  # counted on the TRL side (velotune's decode may replay CUDA graphs: no hooks)
                out["tokens_per_row"] = self.forwards
                out["est_generation_s"] = round((now - self.t_gen) * completion_len / self.forwards, 1)
        elif self.phase == "training":
            out["generation_s"] = round(self.gen_s, 1)
        return out


def out_of_memory(e: BaseException) -> bool:
    """torch's OutOfMemoryError, or velotune's errors that say memory ran out (generation's KV-cache check, the
    Trainer at micro-batch 1)."""
    text = str(e)
    return (
        any(t.__name__ == "OutOfMemoryError" for t in type(e).__mro__)
        or "out of memory" in text.lower()
        or "out of GPU memory" in text
        or "of KV cache and logits" in text
    )


class Finish:
    """Writes the run's record once: at the end of the run, or from a timer thread at the time limit, which then
    ends the process at once (the step under way may hold the device for minutes)."""

    def __init__(self, a: argparse.Namespace, rec: dict, steps: Steps) -> None:
        self.a, self.rec, self.steps, self.t0 = a, rec, steps, time.time()
        self.lock, self.written = threading.Lock(), False

    def arm(self, seconds: float) -> None:
        timer = threading.Timer(seconds, self._timeout)
        timer.daemon = True
        timer.start()

    def _timeout(self) -> None:
        if self.write(timeout=True, unfinished=self.steps.unfinished(self.a.completion_len)):
            os._exit(0)

    def write(self, **extra: Any) -> bool:
        with self.lock:
            if self.written:
                return False
            self.written = True
            rec, a = self.rec, self.a
            rec.update(extra)
            summarize(a, rec, self.steps)
            failed = rec.get("timeout") or rec.get("error")
            rec["ok"] = not failed and (a.longest or len(self.steps.done) == a.steps)
            rec.update(
                versions=versions(),
                device=device_name(a.device),
                date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                wall_s=round(time.time() - self.t0, 1),
            )
            line = json.dumps(rec)
            print("RESULT " + line, flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(line + "\n")
            return True


def summarize(a: argparse.Namespace, rec: dict, steps: Steps) -> None:
    """Medians over the steps after the first; with one step done, that step (`warmup_only`)."""
    done = list(steps.done)
    rec["step_times"] = done
    timed = done[1:]
    rec["timed_steps"] = len(timed)
    pick = timed or done[:1]
    if pick:
        for key in ("step_s", "generation_s", "training_s"):
            rec[key] = round(statistics.median(d[key] for d in pick), 3)
        rec["completion_tok_s"] = round(rec["completions_per_step"] * a.completion_len / rec["step_s"], 1)
        rec["warmup_only"] = not timed
    rec.update(memory(a.device))


# ---- velotune ----------------------------------------------------------------------------------------------------


def load_velotune(a: argparse.Namespace) -> Any:
    """The checkpoint in velotune (NF4 quantized while loading, or bf16) with LoRA on the 7 projections."""
    import torch

    from velotune.lora.apply import get_peft_model
    from velotune.quant.loading import load_quantized

    model, _ = load_quantized(a.dir, "nf4" if a.nf4 else None, torch.bfloat16, a.device, with_tokenizer=False)
    torch.manual_seed(SEED)
    get_peft_model(model, r=a.r, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=TARGETS)
    model.gradient_checkpointing = {"1": True, "offload": "offload"}[a.ckpt]
    return model


def velotune_config(a: argparse.Namespace, completion_len: int, steps: int) -> Any:
    """TrainConfig of the run: a step is prompts x generations rows, micro-batches of --micro_batch rows."""
    from velotune.train.config import TrainConfig

    rows = a.prompts * a.generations
    return TrainConfig(
        learning_rate=a.lr,
        per_device_train_batch_size=a.micro_batch,
        gradient_accumulation_steps=rows // a.micro_batch,
        max_steps=steps,
        lr_scheduler_type="constant",
        optim="adamw_torch",  # torch's fused AdamW on CUDA (train/optim.py)
        max_grad_norm=1.0,
        logging_steps=1,
        save_steps=0,
        seed=SEED,
        gradient_checkpointing={"1": True, "offload": "offload"}[a.ckpt],
        method="grpo",
        beta=0.0,
        loss_type="dapo",
        reward_funcs=["bench_reward"],  # the objective below holds the function itself
        num_generations=a.generations,
        max_completion_length=completion_len,
        log_completions_steps=0,
    )


def grpo_kwargs(a: argparse.Namespace, completion_len: int) -> dict:
    """velotune's GRPO objective as TRL's GRPOConfig below: temperature 1, no top-k/p, beta 0, dapo."""
    return dict(
        num_generations=a.generations,
        max_completion_length=completion_len,
        temperature=1.0,
        beta=0.0,
        loss_type="dapo",
        micro_batch_size=a.micro_batch,
        seed=SEED,
        log_completions_steps=0,
    )


def run_velotune(a: argparse.Namespace, examples: list[dict], rec: dict, steps: Steps) -> None:
    """velotune's Trainer with its GRPO objective (generation timed by a subclass); fills rec."""
    import torch
    from transformers import AutoTokenizer

    from velotune.train.callbacks import TrainerCallback
    from velotune.train.loop import Trainer
    from velotune.train.objectives.grpo import GRPO

    t0 = time.time()
    model = load_velotune(a)
    rec["checkpointing"] = model.checkpoint_mode

    class TimedGRPO(GRPO):
        def prepare_step(self, examples: list[dict], step: int) -> list[dict]:
            steps.generation_start()
            rows = super().prepare_step(examples, step)
            steps.generation_end()
            return rows

    objective = TimedGRPO(
        [("bench_reward", bench_reward)],
        NoStopTokenizer(AutoTokenizer.from_pretrained(a.dir)),
        **grpo_kwargs(a, a.completion_len),
    )
    lengths, losses = rec.setdefault("completion_lengths", []), rec.setdefault("losses", [])

    class StepEnd(TrainerCallback):
        def on_step_end(self, step: int, rank: int) -> None:
            steps.step_end()
            lengths.append(objective.step_info().get("completions/mean_length"))

    cfg = velotune_config(a, a.completion_len, a.steps)
    trainer = Trainer(model, examples, cfg, PAD, progress=False, objective=objective, callbacks=[StepEnd()])
    rec["load_s"] = round(time.time() - t0, 1)
    rec["trainable"] = sum(p.numel() for p in trainer.params)
    if a.device.startswith("cuda"):
        rec["mem_after_load_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    steps.start()
    result = trainer.train()
    losses.extend(round(x, 4) for x in result.losses)
    if result.oom_events:  # the Trainer halved the micro-batch and retried the step
        rec["oom_events"] = result.oom_events


# ---- velotune: the longest completion that fits ------------------------------------------------------------------


def probe_generation(a: argparse.Namespace, model: Any, vocab: int, length: int) -> dict:
    """Generation at full size: per prompt a group of `generations` rows whose KV cache holds prompt + length slots
    (a prompt of prompt_len + length - k tokens, then k new tokens), decoding timed there and at the start of the
    cache (a prompt of prompt_len); per-token decode times from k = probe/4 and k = probe new tokens. The step's
    generation time is estimated as length x the mean of the two rates (attention reads grow linearly)."""
    import torch

    from velotune.models.generate import SamplingParams, generate_batch

    g = torch.Generator().manual_seed(length)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)

    def timed(prompt_len: int, new: int) -> float:
        prompts = [torch.randint(4, vocab, (prompt_len,), generator=g).tolist() for _ in range(a.prompts)]
        params = SamplingParams(max_new_tokens=new, temperature=1.0, num_return_sequences=a.generations, seed=SEED)
        sync()
        t = time.perf_counter()
        done = generate_batch(model, prompts, params)
        sync()
        assert all(len(c.tokens) == new for c in done), "no stop tokens: every row runs to max_new_tokens"
        return time.perf_counter() - t

    k1, k2 = max(a.probe_tokens // 8, 1), a.probe_tokens
    reset_peak(a.device)
    # both requests of a pair prefill the same prompt, so their difference is k2 - k1 decode steps alone
    far = [timed(a.prompt_len + length - k2, k) for k in (k1, k2)]
    peak = memory(a.device)
    near = [timed(a.prompt_len, k) for k in (k1, k2)]
    per_far, per_near = (far[1] - far[0]) / (k2 - k1), (near[1] - near[0]) / (k2 - k1)
    return {
        "ok": True,
        "what": f"KV cache of {a.prompts * a.generations} rows x {a.prompt_len + length} slots; {k1} and {k2} new "
        "tokens decoded at its end and at its start; generation time estimated",
        "decode_ms_start": round(1000 * per_near, 2),
        "decode_ms_end": round(1000 * per_far, 2),
        "est_generation_s": round(length * (per_near + per_far) / 2 + near[0] - k1 * per_near, 1),
        **peak,
    }


def probe_training(a: argparse.Namespace, model: Any, vocab: int, length: int) -> dict:
    """One optimizer step of velotune's Trainer + GRPO loss on given completions: prompts x generations rows of
    prompt_len + length random tokens with group-normalised random advantages; timed, peak memory."""
    import torch

    from velotune.data.masking import IGNORE
    from velotune.train.loop import Trainer
    from velotune.train.objectives.grpo import GRPO, group_advantages

    class GivenCompletions(GRPO):
        """GRPO's training half on completions given in advance instead of sampled."""

        def prepare_step(self, examples: list[dict], step: int) -> list[dict]:
            return [
                {"input_ids": e["prompt_ids"] + c, "labels": [IGNORE] * len(e["prompt_ids"]) + c, "advantage": adv}
                | {"row": e["row"]}
                for e in examples
                for c, adv in zip(e["completions"], e["advantages"], strict=True)
            ]

    g = torch.Generator().manual_seed(length)
    examples = prompt_examples(a.prompts, vocab, a.prompt_len, seed=length)
    for e in examples:
        e["completions"] = [torch.randint(4, vocab, (length,), generator=g).tolist() for _ in range(a.generations)]
        e["advantages"] = group_advantages(torch.rand(a.generations, generator=g), a.generations)[0].tolist()
    objective = GivenCompletions([("bench_reward", bench_reward)], None, **grpo_kwargs(a, length))
    trainer = Trainer(model, examples, velotune_config(a, length, 1), PAD, progress=False, objective=objective)
    clock = Steps(a.device)
    clock.start()
    result = trainer.train()
    clock.step_end()
    out = {"ok": True, "what": f"one optimizer step on {len(examples) * a.generations} given completions"}
    out |= {"train_s": clock.done[0]["step_s"], "loss": round(result.losses[0], 4), **memory(a.device)}
    out |= {"micro_batch": result.micro_batch_size, "accumulation": result.accumulation}
    if result.oom_events:
        out["oom_events"] = result.oom_events
    return out


def run_longest(a: argparse.Namespace, rec: dict, vocab: int) -> None:
    """For each length (ascending) until one does not fit: the generation probe, then the training probe."""
    from velotune.train.oom import free_memory

    t0 = time.time()
    model = load_velotune(a)
    rec["load_s"] = round(time.time() - t0, 1)
    rec["checkpointing"] = model.checkpoint_mode
    entries = rec.setdefault("lengths", [])
    for length in sorted(a.lengths):
        entry: dict[str, Any] = {"completion_len": length}
        entries.append(entry)
        for part, probe in (("generation", probe_generation), ("training", probe_training)):
            entry[part] = {"ok": False, "running": True}
            try:
                entry[part] = probe(a, model, vocab, length)
            except Exception as e:  # noqa: BLE001  (out of memory ends the search; anything else is recorded)
                entry[part] = {"ok": False, "oom": out_of_memory(e), "error": f"{type(e).__name__}: {e}"[:400]}
                if not entry[part]["oom"]:
                    entry[part]["tb"] = traceback.format_exc()[-1500:]
            free_memory()
            if not entry[part]["ok"]:
                break
        entry["fits"] = entry["generation"]["ok"] and entry.get("training", {}).get("ok", False)
        if not entry["fits"]:
            break
    fits = [e["completion_len"] for e in entries if e.get("fits")]
    rec["longest_fit"] = max(fits) if fits else None


# ---- TRL ---------------------------------------------------------------------------------------------------------


def grpo_config(a: argparse.Namespace, output_dir: str) -> Any:
    """TRL's GRPOConfig matching velotune's run: groups, lengths (EOS suppressed until the completion length),
    beta 0, dapo, batch split, steps, constant learning rate, clipping 1.0, gradient checkpointing, no vLLM."""
    from trl import GRPOConfig

    cuda = a.device.startswith("cuda")
    rows = a.prompts * a.generations
    return GRPOConfig(
        output_dir=output_dir,
        num_generations=a.generations,
        per_device_train_batch_size=a.micro_batch,
        gradient_accumulation_steps=rows // a.micro_batch,  # one generation of `rows` completions per step
        max_completion_length=a.completion_len,
        generation_kwargs={"min_new_tokens": a.completion_len},  # EOS ignored: every completion is full length
        temperature=1.0,
        beta=0.0,
        loss_type="dapo",
        use_vllm=False,
        max_steps=a.steps,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        gradient_checkpointing=True,
        bf16=cuda,
        use_cpu=not cuda,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        shuffle_dataset=False,
        seed=SEED,
    )


def run_trl(a: argparse.Namespace, examples: list[dict], rec: dict, steps: Steps) -> None:
    """TRL's GRPOTrainer + PEFT LoRA, generation timed by a subclass; fills rec."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    t0 = time.time()
    model, tok, peft = load_hf_model(a)
    peft = dataclasses.replace(peft, lora_alpha=a.alpha)
    model.get_output_embeddings().register_forward_hook(lambda *_: steps.forward())
    rec["ids_match"] = tok(text=[examples[0]["prompt"]])["input_ids"][0] == examples[0]["prompt_ids"]

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs: Any) -> Any:
            steps.generation_start()
            out = super()._generate_and_score_completions(inputs)
            steps.generation_end()
            return out

    lengths, losses = rec.setdefault("completion_lengths", []), rec.setdefault("losses", [])

    class StepEnd(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            steps.start()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            steps.step_end()

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                losses.append(round(float(logs["loss"]), 4))
                lengths.append(logs.get("completions/mean_length"))

    dataset = Dataset.from_list([{"prompt": e["prompt"]} for e in examples])
    with tempfile.TemporaryDirectory() as out:
        trainer = TimedGRPOTrainer(
            model=model,
            reward_funcs=[bench_reward],
            args=grpo_config(a, out),
            train_dataset=dataset,
            processing_class=tok,
            peft_config=peft,
            callbacks=[StepEnd()],
        )
        rec["load_s"] = round(time.time() - t0, 1)
        rec["trainable"] = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        if a.device.startswith("cuda"):
            rec["mem_after_load_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
        trainer.train()


# ---- one run, the table ------------------------------------------------------------------------------------------


def run(a: argparse.Namespace) -> dict:
    """One implementation's GRPO steps (or --longest); the record is printed and appended to a.out."""
    rec: dict[str, Any] = {
        "impl": a.impl,
        "dtype": "nf4" if a.nf4 else "bf16",
        "preset": a.preset,
        "prompts": a.prompts,
        "generations": a.generations,
        "completions_per_step": a.prompts * a.generations,
        "prompt_len": a.prompt_len,
        "completion_len": a.completion_len,
        "r": a.r,
        "alpha": a.alpha,
        "beta": 0.0,
        "loss_type": "dapo",
        "micro_batch": a.micro_batch,
        "ckpt": a.ckpt if a.impl == "velotune" else "1",
        "steps": a.steps,
        "warmup": 1,
        "time_limit": a.time_limit,
    }
    if a.longest:
        rec.update(longest=True, steps=0, completion_len=None, lengths_tried=sorted(a.lengths))
    steps = Steps(a.device)
    finish = Finish(a, rec, steps)
    if a.time_limit:
        finish.arm(a.time_limit)
    try:
        if (a.prompts * a.generations) % a.micro_batch:
            raise ValueError(f"--micro_batch {a.micro_batch} does not divide {a.prompts} x {a.generations} rows")
        info = make_checkpoint(a.dir, a.preset)
        rec["preset"] = info["preset"]
        vocab = PRESETS[info["preset"]]["vocab_size"]
        if a.longest:
            run_longest(a, rec, vocab)
        else:
            examples = prompt_examples(a.steps * a.prompts, vocab, a.prompt_len)
            (run_velotune if a.impl == "velotune" else run_trl)(a, examples, rec, steps)
    except Exception as e:  # noqa: BLE001  (record the failure, keep the benchmark going)
        rec.update(oom=out_of_memory(e), error=f"{type(e).__name__}: {e}"[:600], tb=traceback.format_exc()[-2000:])
    finish.write()
    return rec


NAMES = {"velotune": "velotune", "trl": "TRL GRPOTrainer + PEFT"}


def _num(x: Any, digits: int = 2) -> str:
    return "" if x is None else f"{x:,.{digits}f}"


def _note(r: dict) -> str:
    notes = []
    if r.get("oom"):
        notes.append("out of memory")
    elif r.get("timeout"):
        u = r.get("unfinished", {})
        notes.append(f"time limit ({r.get('time_limit')} s): {len(r.get('step_times', []))} of {r['steps']} steps")
        if "est_generation_s" in u:
            notes.append(
                f"generation had {u['tokens_per_row']} of {r['completion_len']} tokens per row after "
                f"{u['generation_elapsed_s']} s (est. {u['est_generation_s']} s)"
            )
        elif u.get("phase") in ("generation", "training"):
            done = f" (generation took {u['generation_s']} s)" if "generation_s" in u else ""
            notes.append(f"unfinished step: {u.get('step_elapsed_s')} s, in {u['phase']}{done}")
        if r.get("peak_gib"):
            notes.append("peak until stopped")
    elif r.get("error"):
        notes.append("failed: " + r["error"].replace("|", "/").replace("\n", " ")[:160])
    if r.get("warmup_only"):
        notes.append("one step: warm-up included")
    if r.get("ids_match") is False:
        notes.append("prompt ids differ")
    short = [n for n in r.get("completion_lengths", []) if n is not None and n != r["completion_len"]]
    if short:
        notes.append(f"completions of mean length {short[0]}, not {r['completion_len']}")
    if r.get("oom_events"):
        notes.append(f"micro-batch halved after out of memory ({len(r['oom_events'])}x)")
    return "; ".join(notes)


def _lower_bound(r: dict) -> float | None:
    """Seconds a timed-out run's unfinished first step had taken (its step time is longer)."""
    u = r.get("unfinished") or {}
    return u.get("step_elapsed_s") if r.get("timeout") and not r.get("step_s") else None


def _ratio_line(v: dict, t: dict) -> str:
    shape = f"{v['dtype']}, {v['completions_per_step']} x ({v['prompt_len']} + {v['completion_len']})"
    head = f"- velotune / {NAMES['trl']}, {shape}: "
    if t.get("step_s"):
        speed = t["step_s"] / v["step_s"]
        gen = t["generation_s"] / v["generation_s"] if v["generation_s"] else float("nan")
        train = t["training_s"] / v["training_s"] if v["training_s"] else float("nan")
        mem = f"{v['peak_gib'] / t['peak_gib']:.2f}x" if v.get("peak_gib") and t.get("peak_gib") else "n/a"
        return head + f"step rate {speed:.2f}x (generation {gen:.2f}x, training {train:.2f}x), peak memory {mem}"
    if t.get("oom"):
        return head + f"TRL ran out of memory; velotune {v['step_s']} s/step at {v.get('peak_gib')} GiB"
    bound = _lower_bound(t)
    if bound:
        line = head + f"step rate > {bound / v['step_s']:.2f}x (TRL's first step unfinished after {bound} s"
        est = (t.get("unfinished") or {}).get("est_generation_s")
        if est:
            line += f"; its generation est. {est} s: {est / v['generation_s']:.2f}x velotune's"
        return line + ")"
    return head + "no TRL step time"


def table(path: str) -> str:
    """Markdown: one row per run, then velotune / TRL ratios per dtype and shape, then --longest runs."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    runs = [r for r in rows if not r.get("longest")]
    out = [
        "| implementation | dtype | completions x (prompt + completion) | s/step | generation s | training s "
        "| completion tokens/s | peak GiB | note |",
        "|---|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in runs:
        shape = f"{r.get('completions_per_step', '?')} x ({r.get('prompt_len', '?')} + {r.get('completion_len', '?')})"
        step = _num(r.get("step_s")) or (f"> {_lower_bound(r)}" if _lower_bound(r) else "")
        cells = [step, _num(r.get("generation_s")), _num(r.get("training_s")), _num(r.get("completion_tok_s"), 0)]
        cells += [_num(r.get("peak_gib")), _note(r)]
        out.append(
            f"| {NAMES.get(r['impl'], r['impl'])} | {r.get('dtype', '?')} | {shape} | " + " | ".join(cells) + " |"
        )
    out.append("")
    key = lambda r: (r.get("dtype"), r.get("completion_len"), r.get("prompt_len"), r.get("completions_per_step"))  # noqa: E731
    for v in runs:
        if v["impl"] != "velotune" or not v.get("step_s"):
            continue
        for t in runs:
            if t["impl"] == "trl" and key(t) == key(v):
                out.append(_ratio_line(v, t))
    for r in rows:
        if not r.get("longest"):
            continue
        fit = r.get("longest_fit")
        head = f"- velotune, longest completion that fits ({r['dtype']}, {r.get('completions_per_step')} completions, "
        head += f"prompt {r.get('prompt_len')}, micro-batch {r.get('micro_batch')}): {fit or 'none'}"
        if r.get("timeout"):
            head += f" (time limit {r.get('time_limit')} s reached)"
        if r.get("error"):
            head += " (failed: " + r["error"][:160] + ")"
        out.append(head)
        for e in r.get("lengths", []):
            g, t = e.get("generation", {}), e.get("training", {})
            part = f"  - {e['completion_len']}: "
            part += (
                f"generation est. {g['est_generation_s']} s ({g['decode_ms_start']}-{g['decode_ms_end']} ms/token), "
                f"peak {_num(g.get('peak_gib')) or 'n/a'} GiB"
                if g.get("ok")
                else "generation " + ("out of memory" if g.get("oom") else g.get("error", "unfinished"))
            )
            if t:
                part += "; " + (
                    f"training step {t['train_s']} s, peak {_num(t.get('peak_gib')) or 'n/a'} GiB"
                    if t.get("ok")
                    else "training " + ("out of memory" if t.get("oom") else t.get("error", "unfinished"))
                )
            out.append(part)
    for impl in NAMES:
        done = [r for r in rows if r["impl"] == impl and r.get("versions")]
        if done:
            keys = (
                ["torch", "transformers"] if impl == "velotune" else [k for k in done[0]["versions"] if k != "unsloth"]
            )
            shown = ", ".join(f"{k} {done[0]['versions'][k]}" for k in keys if k in done[0]["versions"])
            out.append(f"- {NAMES[impl]} runs: {shown}")
    return "\n".join(out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("cmd", choices=["make", "run", "table"])
    ap.add_argument("--dir", default="/tmp/m_dpo", help="the random checkpoint (made when missing)")
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--impl", default="velotune", choices=sorted(NAMES))
    ap.add_argument("--bf16", action="store_true", help="bf16 base weights; NF4 (QLoRA) otherwise")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompts", type=int, default=1, help="prompts per step")
    ap.add_argument("--generations", type=int, default=8, help="completions per prompt (num_generations)")
    ap.add_argument("--prompt_len", type=int, default=256)
    ap.add_argument("--completion", "--completion_len", dest="completion_len", type=int, default=1024)
    ap.add_argument("--micro_batch", type=int, default=None, help="rows per forward (default 8; 1 with --longest)")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--ckpt", default="1", choices=["1", "offload"], help="velotune's gradient checkpointing")
    ap.add_argument("--steps", type=int, default=3, help="steps in all; the first is the warm-up")
    ap.add_argument("--time_limit", type=float, default=0, help="seconds; then the record is written and the run ends")
    ap.add_argument("--longest", action="store_true", help="velotune: the longest of --lengths that fits")
    ap.add_argument("--lengths", default=LENGTHS, help="completion lengths for --longest, comma-separated")
    ap.add_argument("--probe_tokens", type=int, default=256, help="--longest: new tokens per decode-rate probe")
    ap.add_argument("--out", default=None, help="results.jsonl: run appends to it, table reads it")
    a = ap.parse_args(argv)
    a.nf4 = not a.bf16
    a.lengths = [int(x) for x in a.lengths.split(",") if x]
    a.micro_batch = a.micro_batch or (1 if a.longest else 8)
    if a.longest and a.impl != "velotune":
        ap.error("--longest measures velotune only")
    return a


if __name__ == "__main__":
    args = parse_args()
    if args.cmd == "make":
        print(json.dumps(make_checkpoint(args.dir, args.preset)), flush=True)
    elif args.cmd == "table":
        print(table(args.out))
    else:
        run(args)
