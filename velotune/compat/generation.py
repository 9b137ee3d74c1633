"""transformers-style generate() for velotune's decoder: batches with padding, greedy or sampled, with a KV cache.

The arguments and their meaning follow transformers' GenerationConfig: sampling only with do_sample=True
(temperature, top_k, top_p, min_p then apply), repetition_penalty divides positive / multiplies negative logits of
every token already in the row, no_repeat_ngram_size bans tokens that would repeat an n-gram of the row, a streamer
gets the prompt and then each new token. Rows may be left- or right-padded (attention_mask); the result is
[B, prompt + new] with finished rows filled with pad_token_id, as transformers returns it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from velotune.errors import ConfigError
from velotune.models.decoder import CausalLM, KVCache

_DEFAULTS = {
    "max_new_tokens": None,
    "max_length": 20,
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "min_p": None,
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "eos_token_id": None,
    "pad_token_id": None,
}
_ACCEPTED_AND_IGNORED = ("use_cache", "output_scores", "output_logits", "return_dict_in_generate")


@dataclass
class Settings:
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    min_p: float | None
    repetition_penalty: float
    no_repeat_ngram_size: int
    eos: list[int]
    pad: int


def _settings(generation_config: Any, prompt_len: int, kwargs: dict[str, Any]) -> Settings:
    """Explicit arguments over `generation_config` over transformers' defaults; errors for what is unsupported."""
    for name in ("num_beams", "num_return_sequences"):
        value = kwargs.pop(name, None)
        if value not in (None, 1):
            raise ConfigError(f"generate({name}={value}) is not supported; velotune generates one sequence per row")
    for name in _ACCEPTED_AND_IGNORED:
        value = kwargs.pop(name, None)
        if name in ("return_dict_in_generate", "output_scores", "output_logits") and value:
            raise ConfigError(f"generate({name}=True) is not supported; velotune returns the token ids")
    unknown = sorted(set(kwargs) - set(_DEFAULTS))
    if unknown:
        raise ConfigError(f"generate() got unsupported arguments {unknown}; supported: {', '.join(sorted(_DEFAULTS))}")

    def pick(name: str) -> Any:
        if kwargs.get(name) is not None:
            return kwargs[name]
        value = getattr(generation_config, name, None) if generation_config is not None else None
        return value if value is not None else _DEFAULTS[name]

    eos = pick("eos_token_id")
    eos = [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(e) for e in eos]
    pad = pick("pad_token_id")
    if pad is None:
        pad = eos[0] if eos else 0
    max_new = pick("max_new_tokens")
    if kwargs.get("max_new_tokens") is None and kwargs.get("max_length") is not None:
        max_new = None  # an explicit max_length wins over a max_new_tokens from the generation config
    if max_new is None:
        max_new = pick("max_length") - prompt_len
    if max_new < 1:
        raise ConfigError(f"nothing to generate: max_new_tokens={max_new} (prompt of {prompt_len} tokens)")
    return Settings(
        max_new_tokens=int(max_new),
        do_sample=bool(pick("do_sample")),
        temperature=float(pick("temperature")),
        top_k=int(pick("top_k")),
        top_p=float(pick("top_p")),
        min_p=pick("min_p"),
        repetition_penalty=float(pick("repetition_penalty")),
        no_repeat_ngram_size=int(pick("no_repeat_ngram_size")),
        eos=eos,
        pad=int(pad),
    )


def left_align(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rows with their tokens moved to the right end (left padding), as incremental decoding needs."""
    if bool(mask[:, -1].all()):
        return ids, mask
    lengths = mask.sum(-1)  # [B]
    width = ids.shape[1]
    order = torch.argsort(mask, dim=-1, stable=True)  # padding first, then the tokens in their order
    aligned = torch.gather(ids, 1, order)
    new_mask = (torch.arange(width, device=ids.device)[None, :] >= (width - lengths)[:, None]).long()
    return aligned, new_mask


def _penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenalty: logits of seen tokens divided by `penalty` if positive, else multiplied."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


class NgramBan:
    """Per row, the tokens that would complete an n-gram already in the row (no_repeat_ngram_size)."""

    def __init__(self, rows: list[list[int]], n: int) -> None:
        self.n = n
        self.rows = rows
        self.table: list[dict[tuple[int, ...], set[int]]] = [{} for _ in rows]
        for b, row in enumerate(rows):
            for i in range(len(row) - n + 1):
                self.table[b].setdefault(tuple(row[i : i + n - 1]), set()).add(row[i + n - 1])

    def append(self, tokens: list[int]) -> None:
        for b, tok in enumerate(tokens):
            row = self.rows[b]
            row.append(tok)
            if len(row) >= self.n:
                self.table[b].setdefault(tuple(row[len(row) - self.n : -1]), set()).add(tok)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for b, row in enumerate(self.rows):
            if len(row) < self.n - 1:
                continue
            banned = self.table[b].get(tuple(row[len(row) - self.n + 1 :]) if self.n > 1 else ())
            if banned:
                logits[b, sorted(banned)] = float("-inf")
        return logits


def _warp(logits: torch.Tensor, s: Settings) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on [B, V] logits (transformers' order)."""
    logits = logits / s.temperature if s.temperature != 1.0 else logits
    if s.top_k > 0:
        kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum <= 1 - s.top_p
        drop_sorted[:, -1] = False  # keep at least the most likely token
        logits = logits.masked_fill(drop_sorted.scatter(1, order, drop_sorted), float("-inf"))
    if s.min_p is not None and s.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < s.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


@torch.no_grad()
def generate(
    lm: CausalLM,
    generation_config: Any,
    inputs: torch.Tensor | None = None,
    *,
    input_ids: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    streamer: Any = None,
    **kwargs: Any,
) -> torch.Tensor:
    """New tokens after each row of `input_ids` [B, T]; returns [B, T + new] (finished rows padded)."""
    if "generation_config" in kwargs:
        generation_config = kwargs.pop("generation_config") or generation_config
    ids = input_ids if input_ids is not None else inputs
    if ids is None:
        raise ConfigError("generate() needs input_ids (e.g. model.generate(**tokenizer(text, return_tensors='pt')))")
    if ids.dim() == 1:
        ids = ids[None, :]
    ids = ids.to(lm.device)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(lm.device).long()
    s = _settings(generation_config, ids.shape[1], kwargs)
    if streamer is not None and ids.shape[0] > 1:
        raise ConfigError("a streamer takes one sequence; generate with batch size 1 or without streamer")
    ids, mask = left_align(ids, mask)
    batch = ids.shape[0]
    was_training = lm.training
    lm.eval()
    try:
        if streamer is not None:
            streamer.put(ids.cpu())
        rows = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]
        ngrams = NgramBan([list(r) for r in rows], s.no_repeat_ngram_size) if s.no_repeat_ngram_size > 0 else None
        vocab = lm.config.vocab_size
        seen = torch.zeros(batch, vocab, dtype=torch.bool, device=ids.device)  # tokens already in each row
        for b, row in enumerate(rows):
            seen[b, torch.tensor(row, dtype=torch.long, device=ids.device)] = True
        eos = torch.tensor(s.eos, device=ids.device, dtype=torch.long)
        finished = torch.zeros(batch, dtype=torch.bool, device=ids.device)
        cache = KVCache(lm.config.num_layers)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, T]
        padded = not bool(mask.all())
        step_ids, step_pos, new = ids, pos, []
        for _ in range(s.max_new_tokens):
            out = lm(
                step_ids, attention_mask=mask if padded else None, position_ids=step_pos, cache=cache, logits_to_keep=1
            )
            logits = out.logits[:, -1].float()  # [B, V]
            if s.repetition_penalty != 1.0:
                logits = _penalize_repeats(logits, seen, s.repetition_penalty)
            if ngrams is not None:
                logits = ngrams.apply(logits)
            if s.do_sample:
                probs = _warp(logits, s).softmax(-1)
                token = torch.multinomial(probs, 1)[:, 0]
            else:
                token = logits.argmax(-1)
            token = torch.where(finished, torch.full_like(token, s.pad), token)  # [B]
            new.append(token)
            if streamer is not None:
                streamer.put(token.cpu())
            finished |= torch.isin(token, eos)
            if bool(finished.all()):
                break
            seen.scatter_(1, token[:, None], True)
            if ngrams is not None:
                ngrams.append(token.tolist())
            step_ids, step_pos = token[:, None], step_pos[:, -1:] + 1
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
    finally:
        lm.train(was_training)
        if streamer is not None:
            streamer.end()
    return torch.cat((ids, torch.stack(new, dim=1)), dim=1)
