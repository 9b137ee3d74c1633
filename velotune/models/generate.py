"""The one generation engine: many prompts decoded together with a preallocated KV cache, sampling on the device.

`generate_batch` serves `velotune generate` and `velotune chat`, the before/after comparison, the HF-compatible
`generate()` and RL rollouts:

- prompts of any lengths are left-padded into one batch (each row keeps its own positions) and prefilled in row
  chunks; with `num_return_sequences` n a prompt is prefilled once and its keys/values copied to its n rows;
- the cache (decoder.StaticKVCache) holds prompt + max_new_tokens slots per row, allocated once, written in place;
- the next token is chosen on the device: repetition penalty, n-gram ban, then greedy (temperature 0) or
  temperature, top-k, top-p, min-p and one draw per row from the request's generator;
- stop conditions (EOS ids, each row's token budget) live on the device and are read back every `sync_every` steps
  (every step on CPU, where reading back costs nothing); there stop strings are searched in the decoded text, the
  loop ends once every row has finished, and the batch is compacted when half of its rows have;
- on CUDA each decode step replays a CUDA graph captured per (rows, attended-length bucket);
- under FSDP every process takes rank 0's tokens, so all of them run the same forwards and stop together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from velotune.errors import ConfigError
from velotune.models.decoder import CausalLM, StaticKVCache
from velotune.models.rope import rope_kind

log = logging.getLogger("velotune.generate")

PREFILL_TOKENS = 8192  # prompt tokens per prefill forward (rows x padded prompt length)
GRAPH_LENGTH_BUCKET = 256  # a CUDA graph attends to a multiple of this many slots, so one graph serves many steps
GRAPH_KV_WASTE = 0.1  # ... or of more, while reading the unwritten slots costs at most this fraction of the weights
CUDA_SYNC_EVERY = 16  # decode steps between reading the stop conditions back on CUDA
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<｜end▁of▁sentence｜>", "</s>")


@dataclass
class SamplingParams:
    """How one request decodes. temperature 0 is greedy (top-k/top-p/min-p then do nothing); top_k 0 and min_p 0
    are off. repetition_penalty divides positive / multiplies negative logits of tokens already in the row (prompt
    included); no_repeat_ngram_size bans tokens that would repeat an n-gram of the row. A row ends at any of
    eos_token_ids (kept as its last token), after the token that completes one of stop_strings (the text is cut
    before it), or after max_new_tokens. seed: this request's generator (None: torch's global one).
    return_logprobs: log p(token) under the model (before temperature and penalties) of every returned token."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    eos_token_ids: Sequence[int] = ()
    stop_strings: Sequence[str] = ()
    num_return_sequences: int = 1
    seed: int | None = None
    return_logprobs: bool = False

    def __post_init__(self) -> None:
        checks = (
            (self.max_new_tokens >= 1, f"max_new_tokens={self.max_new_tokens}: generate at least 1 token"),
            (0 < self.top_p <= 1, f"top_p={self.top_p} is outside (0, 1]; use 1.0 to switch nucleus sampling off"),
            (self.temperature >= 0, f"temperature={self.temperature} is negative; use 0 for greedy decoding"),
            (self.top_k >= 0, f"top_k={self.top_k} is negative; use 0 to switch top-k off"),
            (0 <= self.min_p <= 1, f"min_p={self.min_p} is outside [0, 1]; use 0 to switch it off"),
            (self.repetition_penalty > 0, f"repetition_penalty={self.repetition_penalty} must be positive (1 = off)"),
            (self.no_repeat_ngram_size >= 0, f"no_repeat_ngram_size={self.no_repeat_ngram_size} is negative"),
            (self.num_return_sequences >= 1, f"num_return_sequences={self.num_return_sequences}: ask for 1 or more"),
            (all(self.stop_strings), "stop_strings holds an empty string, which would stop every row at once"),
        )
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.eos_token_ids = tuple(int(e) for e in self.eos_token_ids)
        self.stop_strings = tuple(self.stop_strings)


@dataclass
class Completion:
    """One generated row: `tokens` end with the EOS id or the token that completed a stop string when there was
    one; `text` (with a tokenizer) is decoded without special tokens and cut before the stop string."""

    prompt_index: int
    tokens: list[int]
    finish_reason: str  # "eos" | "stop" | "length"
    logprobs: list[float] | None = None
    text: str | None = None


TokenCallback = Callable[[int, list[int]], None]  # (row, tokens read back for it since the last call)


def kv_cache_bytes(model: CausalLM, rows: int, length: int) -> int:
    """Bytes of a StaticKVCache of `rows` x `length` slots for this model."""
    cfg = model.config
    per_slot = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * model.dtype.itemsize
    return rows * length * (per_slot + 1)  # + the `filled` flag


def _check_request(model: CausalLM, prompts: list[list[int]], params: SamplingParams, tokenizer: Any) -> None:
    if not prompts:
        raise ConfigError("no prompts to generate from")
    context = model.config.max_position_embeddings
    for i, p in enumerate(prompts):
        if not p:
            raise ConfigError(f"prompt {i} is empty: generation needs at least one token (e.g. a chat-templated text)")
        if len(p) >= context:
            raise ConfigError(
                f"prompt {i} has {len(p)} tokens; the model's context is {context} tokens: shorten it to at most "
                f"{context - 1} so that there is room for a new token"
            )
    if params.stop_strings and tokenizer is None:
        raise ConfigError("stop_strings need the tokenizer (generate_batch(..., tokenizer=tok)) to decode the text")


def _check_memory(model: CausalLM, rows: int, length: int) -> None:
    """On CUDA: the cache must fit in free memory (with room for the step's logits); else say how many rows would."""
    device = model.device
    if device.type != "cuda":
        return
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    per_row = kv_cache_bytes(model, 1, length) + 4 * 4 * model.config.vocab_size  # cache + fp32 logits, probs, noise
    usable = int(0.9 * free) - PREFILL_TOKENS * model.config.intermediate_size * 2 * 3  # prefill activations
    if rows * per_row > usable:
        fit = max(usable // per_row, 0)
        raise ConfigError(
            f"{rows} rows of {length} tokens need {rows * per_row / 2**30:.1f} GiB of KV cache and logits; "
            f"{max(usable, 0) / 2**30:.1f} GiB are free on {device}: at most {fit} rows fit, generate in smaller "
            "batches (or fewer max_new_tokens)"
        )


def _is_sharded(model: torch.nn.Module) -> bool:
    """True for an FSDP2-sharded model: each forward is a collective, so every process must take the same steps."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return False
    return isinstance(model, FSDPModule) and torch.distributed.is_initialized()


def _rank0_choice(tokens: torch.Tensor) -> torch.Tensor:
    """Rank 0's tokens on every process (in place), so all of them continue and stop together."""
    torch.distributed.broadcast(tokens, src=0)
    return tokens


# ---------------------------------------------------------------------------------------------------------------
# Choosing the next token (all on the device)


def _penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenalty: logits of seen tokens divided by `penalty` if positive, else multiplied."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def _ban_ngrams(logits: torch.Tensor, history: torch.Tensor, n: int) -> torch.Tensor:
    """-inf for tokens that would complete an n-gram already in the row. history [R, T]: tokens so far, -1 for
    padding; a row with fewer than n - 1 tokens bans nothing (as transformers)."""
    if history.shape[1] < n:
        return logits
    windows = history.unfold(1, n, 1)  # [R, W, n] every n-gram of the row
    prefix = history[:, history.shape[1] - n + 1 :]  # [R, n-1] the tokens the next one would extend
    match = (windows[:, :, :-1] == prefix[:, None, :]).all(-1) & (prefix >= 0).all(-1, keepdim=True)  # [R, W]
    vocab = logits.shape[-1]
    banned = torch.where(match & (windows[:, :, -1] >= 0), windows[:, :, -1], vocab)  # [R, W], vocab = nothing
    ban = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
    ban.scatter_(1, banned, True)
    return logits.masked_fill(ban[:, :vocab], float("-inf"))


def _warp(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p on [R, V] logits (transformers' order)."""
    logits = logits / p.temperature if p.temperature != 1.0 else logits
    if p.top_k > 0:
        kth = torch.topk(logits, min(p.top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [R, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=False)
        drop = sorted_logits.softmax(-1).cumsum(-1) <= 1 - p.top_p
        drop[:, -1] = False  # keep at least the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    if p.min_p > 0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return logits


def _draw(probs: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
    """One token per row from probs [R, V]: argmax of p / Exp(1) noise, a multinomial draw without a host sync."""
    noise = torch.empty_like(probs).exponential_(generator=gen)
    return (probs / noise).argmax(-1)


# ---------------------------------------------------------------------------------------------------------------
# Decoding state


@dataclass
class _Rows:
    """Device state of the rows still in the batch, slot by slot (compaction keeps them aligned)."""

    ids: torch.Tensor  # [R] output row of each slot
    token: torch.Tensor  # [R] last chosen token
    pos: torch.Tensor  # [R] position of the next token fed
    alive: torch.Tensor  # [R] bool: still generating
    budget: torch.Tensor  # [R] tokens this row may generate (context limit)
    seen: torch.Tensor | None  # [R, V] bool, tokens in the row (repetition penalty)
    history: torch.Tensor | None  # [R, P + max_new] tokens, -1 padding (n-gram ban)

    def keep(self, slots: torch.Tensor) -> None:
        for name in ("ids", "token", "pos", "alive", "budget", "seen", "history"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[slots])


@dataclass
class _Output:
    """Per output row: tokens [N, max_new] (pad after the end), log-probs, how many tokens count, host results."""

    tokens: torch.Tensor
    logprobs: torch.Tensor | None
    count: torch.Tensor  # [N] tokens generated before (and including) the stop
    host_tokens: list[list[int]] = field(default_factory=list)  # read back so far (stop strings, streaming)
    read: int = 0  # steps read back into host_tokens
    stopped: dict[int, tuple[int, str]] = field(default_factory=dict)  # row -> (tokens kept, text) at a stop string


def _left_pad(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [B, P] (0 on padding) and mask [B, P] of prompts right-aligned at P = the longest prompt."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[b, width - len(p) :] = True
    return ids.to(device), mask.to(device)


def _prefill(model: CausalLM, cache: StaticKVCache, ids: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    """Prompts [B, P] into cache rows 0, n, 2n ... (chunks of rows), then copied to the n - 1 rows after each.
    Returns the last position's logits [B * n, V]."""
    b, width = ids.shape
    cache.filled[:, :width] = mask.repeat_interleave(n, 0)
    cache.padded = not bool(mask.all())
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)  # [B, P] each row's own positions
    chunk = max(1, PREFILL_TOKENS // width)
    logits = []
    for start in range(0, b, chunk):
        rows = cache.rows(slice(start * n, (start + chunk) * n, n))
        out = model(ids[start : start + chunk], position_ids=pos[start : start + chunk], cache=rows, logits_to_keep=1)
        logits.append(out.logits[:, -1])
    for k, v in zip(cache.keys, cache.values, strict=True):
        for j in range(1, n):
            k[j::n, :, :width] = k[::n, :, :width]
            v[j::n, :, :width] = v[::n, :, :width]
    cache.length = width
    return torch.cat(logits).repeat_interleave(n, 0)


class _EagerSteps:
    """One-token decode forwards run as they come (CPU, sharded models, configs a graph cannot capture)."""

    def __init__(self, model: CausalLM, cache: StaticKVCache) -> None:
        self.model, self.cache = model, cache

    def __call__(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model(token[:, None], position_ids=pos[:, None], cache=self.cache, logits_to_keep=1)
        return out.logits[:, -1]  # [R, V]

    def reset(self) -> None:
        """The cache's rows changed (compaction)."""


class _GraphSteps:
    """Decode forwards replayed as CUDA graphs, one per (rows, attended slots rounded up to GRAPH_LENGTH_BUCKET).
    The cache is written at a device slot index, so replaying a graph serves every step of its bucket."""

    def __init__(self, model: CausalLM, cache: StaticKVCache) -> None:
        self.model, self.cache = model, cache
        self.slot = torch.zeros(1, dtype=torch.long, device=model.device)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, int], tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        self.eager: _EagerSteps | None = None  # set when a capture failed: the rest of the request runs eagerly

    def bucket(self, rows: int) -> int:
        """Slots per graph: GRAPH_LENGTH_BUCKET, or more while the unwritten slots a graph attends to cost at most
        GRAPH_KV_WASTE of a step's weight reads (one graph for a whole request at small batches)."""
        per_slot = kv_cache_bytes(self.model, rows, 1)
        spare = int(GRAPH_KV_WASTE * self.weight_bytes / per_slot)
        return max(GRAPH_LENGTH_BUCKET, spare // GRAPH_LENGTH_BUCKET * GRAPH_LENGTH_BUCKET)

    def __call__(self, token: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.eager is not None:
            return self.eager(token, pos)
        slot = self.cache.length
        bucket = self.bucket(token.shape[0])
        attend = min(-(-(slot + 1) // bucket) * bucket, self.cache.max_len)
        key = (token.shape[0], attend)
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(token, pos, attend)
            except RuntimeError as e:  # a forward that cannot be captured still decodes, eagerly
                log.warning("velotune: decoding without CUDA graphs (capture failed: %s)", str(e).splitlines()[0])
                self.eager = _EagerSteps(self.model, self.cache)
                return self.eager(token, pos)
        graph, token_in, pos_in, logits = self.graphs[key]
        token_in.copy_(token[:, None])
        pos_in.copy_(pos[:, None])
        self.slot.fill_(slot)
        graph.replay()
        self.cache.length = slot + 1
        return logits[:, -1]

    def _capture(self, token: torch.Tensor, pos: torch.Tensor, attend: int) -> tuple:
        cache, length = self.cache, self.cache.length
        token_in, pos_in = token[:, None].clone(), pos[:, None].clone()
        self.slot.fill_(length)
        cache.slot, cache.attend = self.slot, attend

        def step() -> torch.Tensor:
            cache.length = length  # python bookkeeping only; the graph writes at self.slot
            return self.model(token_in, position_ids=pos_in, cache=cache, logits_to_keep=1).logits

        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up: Triton compiles, workspaces; rewrites this step's slot alike
                step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = step()
        finally:
            cache.slot, cache.length = None, length
        return graph, token_in, pos_in, logits

    def reset(self) -> None:
        self.graphs.clear()


def _graphs_possible(model: CausalLM, sharded: bool, rows: int) -> bool:
    """CUDA graphs need a forward without host syncs or per-call compilation: not sharded, no longrope (it picks its
    table from the furthest position), no soft-capped attention (FlexAttention builds a block mask per call), no
    8-bit base and no 4-bit base dequantized per call (capturing that tripped the CUDA caching allocator's assert,
    torch 2.11): an NF4 base is captured when its decode steps take the GEMV (kernels/nf4_matmul.py, at most
    MAX_ROWS rows), which allocates nothing but its output."""
    from velotune.kernels.nf4_matmul import MAX_ROWS

    cfg = model.config
    quant = model.quantization
    return (
        model.device.type == "cuda"
        and not sharded
        and (quant is None or (quant == "nf4" and rows <= MAX_ROWS))
        and cfg.attn_logit_softcap is None
        and rope_kind(cfg.rope_scaling) != "longrope"
    )


# ---------------------------------------------------------------------------------------------------------------
# The engine


@torch.no_grad()
def generate_batch(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | None = None,
    *,
    tokenizer: Any = None,
    on_tokens: TokenCallback | None = None,
    sync_every: int | None = None,
    cuda_graphs: bool = True,
) -> list[Completion]:
    """Completions of every prompt, `params.num_return_sequences` per prompt (rows i*n .. i*n+n-1 for prompt i).

    tokenizer: needed for stop strings; fills Completion.text. on_tokens(row, tokens) streams each row's tokens as
    they are read back (every step when given; tokens that end up cut by a stop string are not withdrawn).
    sync_every: decode steps between reads of the stop conditions (default: 1 on CPU, CUDA_SYNC_EVERY on CUDA).
    cuda_graphs: replay decode steps as CUDA graphs where possible (CUDA only)."""
    params = params or SamplingParams()
    prompt_lists = [[int(t) for t in p] for p in prompts]
    _check_request(model, prompt_lists, params, tokenizer)
    was_training = model.training
    model.eval()
    try:
        return _run(model, prompt_lists, params, tokenizer, on_tokens, sync_every, cuda_graphs)
    finally:
        model.train(was_training)


def _run(
    model: CausalLM,
    prompts: list[list[int]],
    params: SamplingParams,
    tokenizer: Any,
    on_tokens: TokenCallback | None,
    sync_every: int | None,
    cuda_graphs: bool,
) -> list[Completion]:
    device, n = model.device, params.num_return_sequences
    context = model.config.max_position_embeddings
    budgets = [min(params.max_new_tokens, context - len(p)) for p in prompts for _ in range(n)]
    steps, width = max(budgets), max(len(p) for p in prompts)
    rows_total = len(budgets)
    _check_memory(model, rows_total, width + steps)
    if sync_every is None:
        sync_every = CUDA_SYNC_EVERY if device.type == "cuda" else 1
    if on_tokens is not None:
        sync_every = 1
    sharded = _is_sharded(model)
    gen = torch.Generator(device=device).manual_seed(params.seed) if params.seed is not None else None

    cache = StaticKVCache.allocate(model.config, rows_total, width + steps, model.dtype, device)
    ids, mask = _left_pad(prompts, device)
    logits = _prefill(model, cache, ids, mask, n)
    rows = _initial_rows(model, ids, mask, budgets, params, steps)
    out = _Output(
        tokens=torch.zeros(rows_total, steps, dtype=torch.long, device=device),
        logprobs=torch.zeros(rows_total, steps, device=device) if params.return_logprobs else None,
        count=torch.zeros(rows_total, dtype=torch.long, device=device),
        host_tokens=[[] for _ in range(rows_total)],
    )
    eos = torch.tensor(params.eos_token_ids, dtype=torch.long, device=device)
    graphs = cuda_graphs and _graphs_possible(model, sharded, rows_total)
    decode = (_GraphSteps if graphs else _EagerSteps)(model, cache)
    for step in range(steps):
        token = _choose(logits, rows, params, gen, width + step)
        if sharded:
            token = _rank0_choice(token)
        _record(out, rows, step, token, logits, eos, params.return_logprobs)
        if step + 1 == steps:
            break
        if (step + 1) % sync_every == 0:
            if not _read_back(out, rows, step + 1, params, tokenizer, on_tokens):
                break
            if _compact(rows, cache):
                decode.reset()
        logits = decode(rows.token, rows.pos)
        rows.pos += 1
    _read_back(out, rows, None, params, tokenizer, on_tokens)
    return _completions(out, params, tokenizer, n)


def _initial_rows(
    model: CausalLM, ids: torch.Tensor, mask: torch.Tensor, budgets: list[int], p: SamplingParams, steps: int
) -> _Rows:
    device, n = ids.device, p.num_return_sequences
    seen = history = None
    if p.repetition_penalty != 1.0:
        vocab = model.config.vocab_size
        seen = torch.zeros(ids.shape[0], vocab + 1, dtype=torch.bool, device=device)
        seen.scatter_(1, torch.where(mask, ids, vocab), True)  # [B, V + 1]; padding lands in the extra column
        seen = seen[:, :vocab].repeat_interleave(n, 0)
    if p.no_repeat_ngram_size > 0:
        history = torch.full((ids.shape[0] * n, ids.shape[1] + steps), -1, dtype=torch.long, device=device)
        history[:, : ids.shape[1]] = torch.where(mask, ids, -1).repeat_interleave(n, 0)
    lengths = mask.sum(-1).repeat_interleave(n, 0)  # [R]
    return _Rows(
        ids=torch.arange(len(budgets), device=device),
        token=torch.zeros(len(budgets), dtype=torch.long, device=device),
        pos=lengths.clone(),
        alive=torch.ones(len(budgets), dtype=torch.bool, device=device),
        budget=torch.tensor(budgets, device=device),
        seen=seen,
        history=history,
    )


def _choose(
    logits: torch.Tensor, rows: _Rows, p: SamplingParams, gen: torch.Generator | None, filled: int
) -> torch.Tensor:
    """Next token [R] from the model's logits [R, V] (fp32); `filled` columns of rows.history hold tokens."""
    if rows.seen is not None:
        logits = _penalize_repeats(logits, rows.seen, p.repetition_penalty)
    if rows.history is not None:
        logits = _ban_ngrams(logits, rows.history[:, :filled], p.no_repeat_ngram_size)
    if p.temperature == 0:
        return logits.argmax(-1)
    return _draw(_warp(logits, p).softmax(-1), gen)


def _record(
    out: _Output,
    rows: _Rows,
    step: int,
    token: torch.Tensor,
    logits: torch.Tensor,
    eos: torch.Tensor,
    logprobs: bool,
) -> None:
    """Store this step's tokens (pad 0 for finished rows) and update the rows' state; nothing is read back."""
    rows.token = token
    out.tokens[rows.ids, step] = torch.where(rows.alive, token, 0)
    if logprobs:
        out.logprobs[rows.ids, step] = logits.log_softmax(-1).gather(1, token[:, None])[:, 0]
    out.count.index_add_(0, rows.ids, rows.alive.long())
    rows.alive &= ~(torch.isin(token, eos) | (step + 1 >= rows.budget))
    if rows.seen is not None:
        rows.seen.scatter_(1, token[:, None], True)
    if rows.history is not None:
        rows.history[:, -out.tokens.shape[1] + step] = token


def _read_back(
    out: _Output, rows: _Rows, steps: int | None, p: SamplingParams, tokenizer: Any, on_tokens: TokenCallback | None
) -> bool:
    """Read tokens and stop conditions back to the host; stop strings end rows; stream. False when all rows are
    done. steps None: the end of decoding (read everything)."""
    need_tokens = on_tokens is not None or bool(p.stop_strings)
    if not need_tokens and steps is not None:
        return bool(rows.alive.any())
    end = out.tokens.shape[1] if steps is None else steps
    counts = out.count.tolist()
    chunk = out.tokens[:, out.read : end].tolist()
    for row, new in enumerate(chunk):
        if row in out.stopped:
            continue
        have = out.host_tokens[row]
        keep = max(0, min(len(new), counts[row] - len(have)))
        before = len(have)
        have.extend(new[:keep])
        if p.stop_strings and len(have) > before:
            _find_stop(out, row, before, p.stop_strings, tokenizer, rows)
        if on_tokens is not None and len(have) > before:
            on_tokens(row, have[before:])
    out.read = end
    return bool(rows.alive.any())


def _find_stop(out: _Output, row: int, before: int, stops: Sequence[str], tokenizer: Any, rows: _Rows) -> None:
    """If the row's text now holds a stop string: keep its tokens up to the one that completed it, end the row."""
    tokens = out.host_tokens[row]
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if not any(s in text for s in stops):
        return
    for end in range(before + 1, len(tokens) + 1):  # the first token whose text holds a stop string
        text = tokenizer.decode(tokens[:end], skip_special_tokens=True)
        if any(s in text for s in stops):
            break  # (the last token at the latest, whose text was checked above)
    cut = min(i for i in (text.find(s) for s in stops) if i >= 0)
    del tokens[end:]
    out.stopped[row] = (end, text[:cut])
    out.count[row] = end
    rows.alive &= rows.ids != row


def _compact(rows: _Rows, cache: StaticKVCache) -> bool:
    """Drop finished rows from the batch and the cache once at least half of them have finished."""
    alive = rows.alive.tolist()
    live = sum(alive)
    if live == 0 or live > len(alive) // 2:
        return False
    slots = torch.tensor([i for i, a in enumerate(alive) if a], device=rows.alive.device)
    rows.keep(slots)
    cache.select(slots)
    return True


def _completions(out: _Output, p: SamplingParams, tokenizer: Any, n: int) -> list[Completion]:
    """The rows read back to the host (all of them: called after the last _read_back)."""
    logprobs = out.logprobs.tolist() if out.logprobs is not None else None
    eos = set(p.eos_token_ids)
    result = []
    for row, tokens in enumerate(out.host_tokens):
        if row in out.stopped:
            reason, text = "stop", out.stopped[row][1]
        else:
            reason = "eos" if tokens and tokens[-1] in eos else "length"
            text = None
            if tokenizer is not None:
                text = tokenizer.decode(tokens[:-1] if reason == "eos" else tokens, skip_special_tokens=True)
        lp = logprobs[row][: len(tokens)] if logprobs is not None else None
        result.append(Completion(row // n, tokens, reason, lp, text))
    return result


# ---------------------------------------------------------------------------------------------------------------
# One sequence, and the stop tokens of chat templates


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
    """New token ids after `prompt_ids` (one sequence, without the EOS that ended it); `on_token` sees each as it
    comes. Under FSDP every process generates in step with rank 0 (its tokens are broadcast)."""
    eos = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id or ())
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        eos_token_ids=eos,
        seed=seed,
    )

    def stream(row: int, tokens: list[int]) -> None:
        for t in tokens:
            if t not in eos:
                on_token(t)

    done = generate_batch(model, [prompt_ids], params, on_tokens=stream if on_token is not None else None)[0]
    return done.tokens[:-1] if done.finish_reason == "eos" else done.tokens


def stop_token_ids(tokenizer: object) -> list[int]:
    """EOS plus every end-of-turn marker of the common chat templates that this tokenizer has as one token."""
    vocab = tokenizer.get_vocab()
    ids = {vocab[t] for t in END_OF_TURN_TOKENS if t in vocab}
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)
