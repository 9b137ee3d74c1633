"""transformers-style generate() for velotune's decoder: transformers' arguments translated for the one engine,
velotune.models.generate.generate_batch, and its completions laid out as transformers returns them.

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
from velotune.models.decoder import CausalLM
from velotune.models.generate import SamplingParams, generate_batch

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
    "num_return_sequences": 1,
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
    num_return_sequences: int
    eos: list[int]
    pad: int


def _settings(generation_config: Any, prompt_len: int, kwargs: dict[str, Any]) -> Settings:
    """Explicit arguments over `generation_config` over transformers' defaults; errors for what is unsupported."""
    beams = kwargs.pop("num_beams", None)
    if beams not in (None, 1):
        raise ConfigError(f"generate(num_beams={beams}) is not supported; velotune samples or decodes greedily")
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
    n = int(pick("num_return_sequences"))
    if n > 1 and not pick("do_sample"):
        raise ConfigError(f"num_return_sequences={n} needs do_sample=True: greedy decoding gives one answer per row")
    return Settings(
        max_new_tokens=int(max_new),
        do_sample=bool(pick("do_sample")),
        temperature=float(pick("temperature")),
        top_k=int(pick("top_k")),
        top_p=float(pick("top_p")),
        min_p=pick("min_p"),
        repetition_penalty=float(pick("repetition_penalty")),
        no_repeat_ngram_size=int(pick("no_repeat_ngram_size")),
        num_return_sequences=n,
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


def _params(s: Settings) -> SamplingParams:
    """The engine's parameters for transformers' settings: without do_sample decoding is greedy whatever the
    temperature, as in transformers."""
    return SamplingParams(
        max_new_tokens=s.max_new_tokens,
        temperature=s.temperature if s.do_sample else 0.0,
        top_k=s.top_k,
        top_p=s.top_p,
        min_p=s.min_p or 0.0,
        repetition_penalty=s.repetition_penalty,
        no_repeat_ngram_size=s.no_repeat_ngram_size,
        num_return_sequences=s.num_return_sequences,
        eos_token_ids=s.eos,
    )


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
    """New tokens after each row of `input_ids` [B, T]; returns [B * num_return_sequences, T + new] (the n samples
    of a row next to each other, finished rows padded)."""
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
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True)]

    def stream(row: int, tokens: list[int]) -> None:
        streamer.put(torch.tensor(tokens))

    if streamer is not None:
        streamer.put(ids.cpu())
    try:
        done = generate_batch(lm, prompts, _params(s), on_tokens=stream if streamer is not None else None)
    finally:
        if streamer is not None:
            streamer.end()
    width = max(len(c.tokens) for c in done)
    new = torch.full((len(done), width), s.pad, dtype=ids.dtype)
    for b, c in enumerate(done):
        new[b, : len(c.tokens)] = torch.tensor(c.tokens, dtype=ids.dtype)
    return torch.cat((ids.repeat_interleave(s.num_return_sequences, 0), new.to(ids.device)), dim=1)
