"""Before/after: greedy answers to held-out prompts, scored by exact match against the reference answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from velotune.data import DataConfig, detect_format, render_prompt, to_messages
from velotune.data.formats import apply_field_map
from velotune.data.readers import read_rows
from velotune.models.decoder import CausalLM
from velotune.models.generate import SamplingParams, generate_batch, stop_token_ids


@dataclass
class Sample:
    prompt: list[dict]  # the conversation up to the last assistant turn
    reference: str  # the last assistant turn


@dataclass
class Score:
    correct: int
    total: int
    answers: list[str]

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0


def held_out_samples(cfg: DataConfig, limit: int) -> list[Sample]:
    """Up to `limit` prompts with reference answers from the eval file (none without one)."""
    if cfg.eval_path is None or limit <= 0:
        return []
    out = []
    for source, row in read_rows(cfg.eval_path):
        row = apply_field_map(row, cfg.field_map)
        fmt = cfg.format if cfg.format != "auto" else detect_format(row, source)
        messages = to_messages(row, fmt, source)
        if len(messages) < 2 or messages[-1]["role"] != "assistant":
            continue
        out.append(Sample(messages[:-1], messages[-1]["content"]))
        if len(out) >= limit:
            break
    return out


def normalise(text: str) -> str:
    return " ".join(text.strip().split()).rstrip(".").lower()


def score(model: CausalLM, tokenizer: Any, samples: list[Sample], cfg: DataConfig, max_new_tokens: int) -> Score:
    """Greedy answers to every sample, decoded together in one batch, and how many equal the reference."""
    if not samples:
        return Score(0, 0, [])
    texts = [render_prompt(s.prompt, tokenizer, cfg.template, cfg.system_prompt) for s in samples]
    prompts = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    params = SamplingParams(max_new_tokens=max_new_tokens, eos_token_ids=stop_token_ids(tokenizer))
    answers = [c.text.strip() for c in generate_batch(model, prompts, params, tokenizer=tokenizer)]
    correct = sum(normalise(a) == normalise(s.reference) for a, s in zip(answers, samples, strict=True))
    return Score(correct, len(samples), answers)
