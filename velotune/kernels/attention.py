"""Scaled dot-product attention with the variants the decoder families need.

Causal attention without a mask goes to PyTorch SDPA's fused kernels (FlashAttention on CUDA). A boolean mask
(padding, packed sequences, sliding windows) goes to SDPA with that mask. Attention-logit soft-capping (Gemma 2)
is not expressible in SDPA: on CUDA it runs in PyTorch's FlexAttention (a compiled Triton flash kernel whose
score_mod applies the cap, block mask for causality, windows and padding); elsewhere, and when FlexAttention is
unavailable, it takes the explicit reference path, which holds [B, H, Tq, Tk] fp32 scores.

A full-sequence forward (training, scoring) never builds a [T x T] mask: `document_attention` takes the packed
documents of each row as a [B, T] document-id tensor (`Documents`) and an optional sliding window. On CUDA it is
one FlexAttention call whose block mask is computed from the ids (document, causality, window) and whose score_mod
applies the soft-cap; elsewhere (CPU, or a torch without FlexAttention) each document runs alone through
`attention` (SDPA causal, or the soft-capped reference) and the outputs are concatenated, sliding windows in
query blocks of one window (keys: the block and the window before it). Both are exact; memory is linear in T for
a fixed document length (the CPU soft-cap reference holds one document's [n x n] scores). Masks for KV-cache
steps (generation) stay boolean tensors [B, 1, Tq, Tk].
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from velotune import env
from velotune.kernels._triton import reference_notice

try:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
except ImportError:  # older torch
    flex_attention = create_block_mask = None


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """q [B, Hq, Tq, D], k/v [B, Hk, Tk, D], mask [B, 1, Tq, Tk] bool (True = attend) -> [B, Hq, Tq, D]."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scale  # [B, Hq, Tq, Tk]
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if causal:
        tq, tk = scores.shape[-2:]
        keep = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
        scores = scores.masked_fill(~keep, float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).to(v.dtype) @ v


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query per row (a decode step): q [B, Hq, 1, D] over k/v [B, Hk, Tk, D] with mask [B, 1, 1, Tk].

    The Hq / Hk query heads that share a key head become that head's rows of one matmul, so the cache is read once
    and never expanded (SDPA with a mask and grouped heads takes its math path, which repeats the keys per query head).
    Scores and softmax in float32, as the reference."""
    b, hq, _, d = q.shape
    hk = k.shape[1]
    qg = q.reshape(b, hk, hq // hk, d)  # [B, Hk, G, D]
    scores = (qg @ k.transpose(-1, -2)).float() * scale  # [B, Hk, G, Tk]
    scores = scores.masked_fill(~mask, float("-inf"))  # mask [B, 1, 1, Tk] broadcasts over heads and groups
    out = torch.softmax(scores, dim=-1).to(v.dtype) @ v  # [B, Hk, G, D]
    return out.reshape(b, hq, 1, d)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Attention of q over k/v; `causal` applies the causal mask, `mask` any extra boolean mask."""
    if softcap is not None:
        if q.is_cuda and flex_attention is not None:
            return softcap_attention_flex(q, k, v, mask, causal, scale, softcap)
        reference_notice("soft-capped attention", "this torch has no FlexAttention (torch >= 2.5)", q)
        return attention_reference(q, k, v, mask, causal, scale, softcap)
    gqa = q.shape[1] != k.shape[1]
    if mask is not None and q.shape[2] == 1 and q.is_cuda:
        return decode_attention(q, k, v, mask, scale)
    if mask is not None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)


@dataclass
class Documents:
    """The packed documents of a [B, T] batch: `ids` [B, T] int32 numbers each token's document within its row
    (tokens attend only within their document), or None for one document per row. Row boundaries are read from the
    device once, when the per-document path needs them; FlexAttention's block masks are built once per forward."""

    ids: torch.Tensor | None
    batch: int
    length: int
    block_masks: dict = field(default_factory=dict)  # window -> FlexAttention BlockMask, for this forward

    @functools.cached_property
    def bounds(self) -> list[list[int]]:
        """Per row: where each document starts, then T."""
        if self.ids is None:
            return [[0, self.length]] * self.batch
        starts = torch.ones_like(self.ids, dtype=torch.bool)  # [B, T]
        starts[:, 1:] = self.ids[:, 1:] != self.ids[:, :-1]
        rows: list[list[int]] = [[] for _ in range(self.batch)]
        for b, t in starts.nonzero().tolist():  # one host sync
            rows[b].append(t)
        return [row + [self.length] for row in rows]


def _window_span(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int, scale: float, softcap: float | None
) -> torch.Tensor:
    """Causal sliding-window attention of one document, q/k/v [B, H, n, D], in query blocks of `window` tokens:
    each block sees its own keys and the window - 1 before it, so masks are [window, 2 window - 1]."""
    n, dev = q.shape[2], q.device
    blocks = []
    for s in range(0, n, window):
        e, lo = min(n, s + window), max(0, s - window + 1)
        qi = torch.arange(s, e, device=dev)[:, None]  # [Tq, 1]
        ki = torch.arange(lo, e, device=dev)[None, :]  # [1, Tk]
        mask = (ki <= qi) & (qi - ki < window)  # [Tq, Tk], broadcast over batch and heads
        blocks.append(attention(q[:, :, s:e], k[:, :, lo:e], v[:, :, lo:e], mask, False, scale, softcap))
    return torch.cat(blocks, dim=2)


def _document_span(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None, scale: float, softcap: float | None
) -> torch.Tensor:
    """One document alone: plain causal attention, or windowed when it is longer than the window."""
    if window is not None and q.shape[2] > window:
        return _window_span(q, k, v, window, scale, softcap)
    return attention(q, k, v, None, True, scale, softcap)


def document_attention_split(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    docs: Documents | None,
    window: int | None,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Document-masked causal attention by running each document alone (the CPU path): q [B, Hq, T, D], k/v
    [B, Hk, T, D] -> [B, Hq, T, D]. Rows sharing their boundaries (an unpacked batch) run together."""
    b, t = q.shape[0], q.shape[2]
    bounds = docs.bounds if docs is not None else [[0, t]] * b
    same = all(row == bounds[0] for row in bounds)
    groups = [(slice(None), bounds[0])] if same else [(slice(i, i + 1), row) for i, row in enumerate(bounds)]
    rows = []
    for sel, starts in groups:
        qs, ks, vs = q[sel], k[sel], v[sel]
        pieces = [
            _document_span(qs[:, :, s:e], ks[:, :, s:e], vs[:, :, s:e], window, scale, softcap)
            for s, e in zip(starts, starts[1:], strict=False)
        ]
        rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    return torch.cat(rows) if len(rows) > 1 else rows[0]


def document_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    docs: Documents | None,
    window: int | None,
    scale: float,
    softcap: float | None = None,
) -> torch.Tensor:
    """Causal attention of a full sequence (no KV cache) within packed documents and an optional sliding window. Rows
    up to DENSE_MASK_MAX_TOKENS (CUDA) / DENSE_MASK_MAX_TOKENS_CPU (padded or packed, CPU) take SDPA with a [T x T]
    mask; longer ones never form it: FlexAttention on CUDA, each document alone elsewhere. q [B, Hq, T, D], k/v
    [B, Hk, T, D]; docs None is one document per row."""
    multi = docs is not None and docs.ids is not None
    if q.is_cuda and flex_attention is not None:
        if softcap is None and q.shape[2] <= DENSE_MASK_MAX_TOKENS:
            return dense_document_attention(q, k, v, docs, window, scale)
        return flex_document_attention(q, k, v, docs, window, scale, softcap)
    if multi and softcap is None and q.shape[2] <= DENSE_MASK_MAX_TOKENS_CPU:
        return dense_document_attention(q, k, v, docs, window, scale)  # short padded rows: one SDPA, not one per row
    return document_attention_split(q, k, v, docs, window, scale, softcap)


# On CUDA, rows up to this length keep SDPA with a boolean [T x T] mask (at most 16 MiB per row; SDPA's kernels,
# no compilation per length), as before FlexAttention took document masks: until FlexAttention's document path is
# measured against it on the GPU, only longer rows, where the mask itself costs memory, take FlexAttention.
DENSE_MASK_MAX_TOKENS = 4096
# On the CPU, splitting a padded batch into its documents runs each row alone: below this length one masked SDPA over
# the batch is faster (the bundled-data training test: 330 s split, 61 s so), and its mask is at most 1 MiB a row.
DENSE_MASK_MAX_TOKENS_CPU = 1024


def dense_document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, docs: Documents | None, window: int | None, scale: float
) -> torch.Tensor:
    """document_attention through SDPA with a boolean mask [B, 1, T, T] built from the document ids."""
    i = torch.arange(q.shape[2], device=q.device)
    keep = i[None, :] <= i[:, None]  # [T, T] causal
    if window is not None:
        keep = keep & (i[:, None] - i[None, :] < window)
    mask = keep[None]  # [1, T, T]
    if docs is not None and docs.ids is not None:
        mask = mask & (docs.ids[:, :, None] == docs.ids[:, None, :])  # [B, T, T] same document
    return attention(q, k, v, mask[:, None], False, scale)


# FlexAttention's default tiles for head dim 256 are small (64 x 64 forward, 32/64 backward with 4 warps): on an
# H100 at Gemma-2-9B's shapes they reach 129 TFLOP/s forward and 88 forward+backward. These tiles, measured with
# bench/bench_attention.py on 2026-11-23, do better; other head dims keep FlexAttention's own choice.
_FLEX_TILES = {
    (9, 256): {
        "fwd_BLOCK_M": 128,
        "fwd_BLOCK_N": 64,
        "fwd_num_warps": 8,
        "fwd_num_stages": 2,
        "bwd_BLOCK_M1": 64,
        "bwd_BLOCK_N1": 64,
        "bwd_BLOCK_M2": 64,
        "bwd_BLOCK_N2": 64,
        "bwd_num_warps": 8,
        "bwd_num_stages": 2,
    },
}


def flex_kernel_options(head_dim: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict | None:
    """Tile sizes for FlexAttention on this GPU generation and head dim (None: FlexAttention's defaults). The table
    holds 16-bit tiles: fp32 needs twice the shared memory (128 x 64 tiles at head dim 256 do not fit an H100)."""
    override = env.flex_options()
    if override is not None:
        return override
    if dtype not in (torch.bfloat16, torch.float16) or device.type != "cuda":
        return None
    return _FLEX_TILES.get((torch.cuda.get_device_capability(device)[0], head_dim))


FLEX_LENGTH_MULTIPLE = 128  # lengths are padded to a multiple of this, so FlexAttention compiles one kernel per bucket
FLEX_RECOMPILE_LIMIT = 64  # kernels FlexAttention may compile (buckets x dtypes x head dims) before dynamo gives up


@functools.cache
def _compiled_flex():
    # Static lengths: dynamic=None (automatic dynamic) fails to trace FlexAttention's backward when a second length
    # arrives on torch 2.11. Each length bucket compiles once (seconds); dynamo's default limit of 8 recompiles would
    # then fall back to unfused eager attention, so the call raises it (see softcap_attention_flex).
    return torch.compile(flex_attention, dynamic=False, mode=env.flex_mode())


_BLOCK_MASKS: dict = {}


def _block_mask(mask: torch.Tensor | None, causal: bool, b: int, tq: int, tk: int, pq: int, pk: int, device):
    """FlexAttention block mask over lengths padded to pq, pk for a boolean mask [B, 1, Tq, Tk] or plain causal
    (padded keys are never attended by real queries); the last few are reused."""
    key = (None if mask is None else (mask.data_ptr(), mask._version), causal, b, tq, tk, pq, pk, str(device))
    hit = _BLOCK_MASKS.get(key)
    if hit is not None:
        return hit[1]
    if mask is not None:
        dense = torch.zeros(b, pq, pk, dtype=torch.bool, device=device)
        dense[:, :tq, :tk] = mask[:, 0]

        def mask_mod(bi, h, qi, ki):
            return dense[bi, qi, ki]

        bm = create_block_mask(mask_mod, b, None, pq, pk, device=device, _compile=True)
    elif causal:
        offset = tk - tq

        def mask_mod(bi, h, qi, ki):
            return ki <= qi + offset

        bm = create_block_mask(mask_mod, None, None, pq, pk, device=device, _compile=True)
    elif pk != tk:

        def mask_mod(bi, h, qi, ki):
            return ki < tk

        bm = create_block_mask(mask_mod, None, None, pq, pk, device=device, _compile=True)
    else:
        bm = None
    if len(_BLOCK_MASKS) >= 8:
        _BLOCK_MASKS.pop(next(iter(_BLOCK_MASKS)))
    _BLOCK_MASKS[key] = (mask, bm)  # the mask tensor is held so its data_ptr is not reused while cached
    return bm


def softcap_attention_flex(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    causal: bool,
    scale: float,
    softcap: float,
) -> torch.Tensor:
    """Soft-capped attention, cap * tanh(q k^T * scale / cap), in FlexAttention (CUDA). Same contract as
    attention_reference. Lengths are zero-padded to a multiple of FLEX_LENGTH_MULTIPLE (a padded batch changes
    length every step; each new length would compile a kernel)."""
    cap = float(softcap)

    def score_mod(score, bi, h, qi, ki):
        return cap * torch.tanh(score / cap)

    b, tq, tk = q.shape[0], q.shape[2], k.shape[2]
    pq, pk = (-(-t // FLEX_LENGTH_MULTIPLE) * FLEX_LENGTH_MULTIPLE for t in (tq, tk))
    bm = _block_mask(mask, causal, b, tq, tk, pq, pk, q.device)
    if pq != tq:
        q = F.pad(q, (0, 0, 0, pq - tq))
    if pk != tk:
        k, v = F.pad(k, (0, 0, 0, pk - tk)), F.pad(v, (0, 0, 0, pk - tk))
    out = _run_flex(q, k, v, bm, scale, score_mod)
    return out[:, :, :tq] if pq != tq else out


def _run_flex(q, k, v, bm, scale: float, score_mod, compiled: bool = True) -> torch.Tensor:
    """The compiled FlexAttention call on length-padded q/k/v (recompile limit raised, tiles from the table)."""
    gqa = q.shape[1] != k.shape[1]
    if not compiled:
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=bm, scale=scale, enable_gqa=gqa)
    options = flex_kernel_options(q.shape[-1], q.device, q.dtype)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"  # < 2.6
    with torch._dynamo.config.patch({limit: FLEX_RECOMPILE_LIMIT}):
        return _compiled_flex()(
            q, k, v, score_mod=score_mod, block_mask=bm, scale=scale, enable_gqa=gqa, kernel_options=options
        )


def _document_block_mask(
    docs: Documents | None, window: int | None, b: int, t: int, p: int, device, compiled: bool = True
):
    """FlexAttention block mask over length p (>= t) for documents and a window: a query sees earlier keys of its
    own document within the window. Padded positions are a document of their own (id -1). Built from the ids, so no
    [T x T] tensor exists; kept on `docs` for the other layers of this forward."""
    if docs is not None and window in docs.block_masks:
        return docs.block_masks[window]
    ids = torch.full((1 if docs is None or docs.ids is None else b, p), -1, dtype=torch.int32, device=device)
    ids[:, :t] = 0 if docs is None or docs.ids is None else docs.ids  # [B or 1, P]
    per_row = ids.shape[0] > 1
    w = window or p

    def mask_mod(bi, h, qi, ki):
        row = bi if per_row else 0
        return (ids[row, qi] == ids[row, ki]) & (ki <= qi) & (qi - ki < w)

    bm = create_block_mask(mask_mod, b if per_row else None, None, p, p, device=device, _compile=compiled)
    if docs is not None:
        docs.block_masks[window] = bm
    return bm


def flex_document_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    docs: Documents | None,
    window: int | None,
    scale: float,
    softcap: float | None = None,
    compiled: bool = True,
) -> torch.Tensor:
    """document_attention in FlexAttention (CUDA): one call, a block mask from the document ids, the soft-cap as
    score_mod. Lengths are zero-padded to a multiple of FLEX_LENGTH_MULTIPLE (one compiled kernel per bucket).
    compiled=False runs FlexAttention eagerly, which materialises the scores: a CPU check of the masks, forward only."""
    t = q.shape[2]
    p = -(-t // FLEX_LENGTH_MULTIPLE) * FLEX_LENGTH_MULTIPLE
    bm = _document_block_mask(docs, window, q.shape[0], t, p, q.device, compiled)
    if p != t:
        q, k, v = (F.pad(x, (0, 0, 0, p - t)) for x in (q, k, v))
    score_mod = None
    if softcap is not None:
        cap = float(softcap)

        def score_mod(score, bi, h, qi, ki):
            return cap * torch.tanh(score / cap)

    out = _run_flex(q, k, v, bm, scale, score_mod, compiled)
    return out[:, :, :t] if p != t else out
