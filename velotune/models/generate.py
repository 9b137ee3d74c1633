"""Token generation with a KV cache: greedy or sampled (temperature, top-k, top-p, repetition penalty)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from velotune.models.decoder import CausalLM, KVCache


def _sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        drop = sorted_p.cumsum(0) - sorted_p > top_p
        sorted_p[drop] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


def _is_sharded(model: torch.nn.Module) -> bool:
    """True for an FSDP2-sharded model: each forward is a collective, so every process must take the same steps."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule) and torch.distributed.is_initialized()


def _rank0_choice(tok: int, device: torch.device) -> int:
    """Rank 0's token on every process, so all of them continue and stop together."""
    t = torch.tensor([tok], device=device)
    torch.distributed.broadcast(t, src=0)
    return int(t)


@torch.no_grad()
def generate(
    model: CausalLM,
    prompt_ids: Sequence[int],
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    eos_token_id: int | Sequence[int] | None = None,
    on_token: Callable[[int], None] | None = None,
    seed: int | None = None,
) -> list[int]:
    """New token ids after `prompt_ids` (one sequence), stopping at any EOS id; `on_token` sees each as it comes.
    Under FSDP every process generates in step with rank 0 (its tokens are broadcast)."""
    was_training = model.training
    model.eval()
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = KVCache(model.config.num_layers)
    ids = torch.tensor([list(prompt_ids)], device=model.device)
    out: list[int] = []
    seen = set(prompt_ids)
    sharded = _is_sharded(model)
    for _ in range(max_new_tokens):
        logits = model(ids, cache=cache, logits_to_keep=1).logits[0, -1].float().cpu()
        if repetition_penalty != 1.0 and seen:
            idx = torch.tensor(sorted(seen))
            vals = logits[idx]
            logits[idx] = torch.where(vals > 0, vals / repetition_penalty, vals * repetition_penalty)
        tok = _sample(logits, temperature, top_k, top_p, gen)
        if sharded:
            tok = _rank0_choice(tok, model.device)
        if tok in eos:
            break
        out.append(tok)
        seen.add(tok)
        if on_token is not None:
            on_token(tok)
        ids = torch.tensor([[tok]], device=model.device)
    model.train(was_training)
    return out


END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<｜end▁of▁sentence｜>", "</s>")


def stop_token_ids(tokenizer: object) -> list[int]:
    """EOS plus every end-of-turn marker of the common chat templates that this tokenizer has as one token."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)
