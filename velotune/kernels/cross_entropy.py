"""Chunked linear + cross-entropy: the loss of hidden states against a vocabulary projection without ever holding
the full [tokens x vocab] logits, and the per-token log-probabilities of the targets (DPO, ORPO, GRPO) the same way.

Tokens are processed in chunks; each chunk's logits live only inside the forward, where the gradient with respect
to the hidden states (and the head weight, if it trains) is computed right away and kept for backward. Optional
final-logit soft-capping (Gemma 2) is applied inside.

The loss is -sum of the log-probabilities, so both share one chunk pass (`_chunk_passes`). Their gradients differ
in what backward receives: the loss gets one scalar, so forward can finish both gradients; the log-probabilities
get one weight per token. d logp_i / d hidden_i depends on row i only, so forward keeps those rows ([N, H] in the
hidden dtype) and backward scales them; the head weight's gradient sums over all rows with their weights, so when
it trains backward runs the chunks again.

Per chunk, the PyTorch path (the reference, and the CPU path) upcasts the logits and builds softmax and gradient
in fp32: two or more [chunk, vocab] fp32 tensors beside the 16-bit logits (2 GiB each for 4096 x 128256, more with
a softcap), plus the 16-bit copy of the gradient. On CUDA one Triton program per token reads its 16-bit logits
row twice (an online log-sum-exp, then softmax - onehot) in fp32 and writes the gradient over the logits, so a
chunk costs the logits matmul, this kernel and the gradient matmul(s), with the 16-bit logits as the only
[chunk, vocab] buffer, reused across chunks.
"""

from __future__ import annotations

import torch

from velotune.kernels._triton import no_triton_reason, reference_notice, tl, triton, use_triton

IGNORE_INDEX = -100


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None = None
) -> torch.Tensor:
    """Sum of token losses. hidden [N, H], weight [V, H], targets [N] (IGNORE_INDEX skipped). Materialises logits."""
    logits = (hidden @ weight.t()).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


def linear_token_logps_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None = None
) -> torch.Tensor:
    """log_softmax(hidden @ weight.T)[i, targets[i]], fp32 [N]; 0 where targets[i] is IGNORE_INDEX. Materialises
    logits."""
    logits = (hidden @ weight.t()).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    valid = targets != IGNORE_INDEX
    logps = torch.log_softmax(logits, dim=-1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)  # [N]
    return logps.masked_fill(~valid, 0.0)


def chunk_loss_and_grad_reference(
    logits: torch.Tensor, targets: torch.Tensor, softcap: float | None, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(token losses [C] fp32, 0 where ignored; d loss sum / d logits or None) for one chunk: logits [C, V],
    targets [C]."""
    logits = logits.float()
    if softcap is not None:
        capped = torch.tanh(logits / softcap)
        logits = softcap * capped
    valid = targets != IGNORE_INDEX
    safe_t = targets.clamp(min=0)
    lse = torch.logsumexp(logits, dim=-1)  # [C]
    picked = logits.gather(1, safe_t[:, None]).squeeze(1)
    losses = (lse - picked) * valid
    if not need_grad:
        return losses, None
    # d loss / d logits = softmax - onehot, zero for ignored tokens
    grad = torch.softmax(logits, dim=-1)
    grad.scatter_add_(1, safe_t[:, None], -torch.ones_like(lse)[:, None])
    grad *= valid[:, None]
    if softcap is not None:
        grad *= 1 - capped * capped
    return losses, grad


if triton is not None:

    @triton.jit
    def _softcap(z, cap, HAS_SOFTCAP: tl.constexpr):
        """(cap * tanh(z / cap), tanh(z / cap)) in fp32; (z, z) without a cap."""
        t = z
        if HAS_SOFTCAP:
            t = 2.0 * tl.sigmoid(2.0 * (z / cap)) - 1.0
            z = cap * t
        return z, t

    @triton.jit
    def _chunk_loss_grad_kernel(
        logits_ptr,
        targets_ptr,
        loss_ptr,
        n_cols,
        stride,
        cap,
        ignore_index,
        HAS_SOFTCAP: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr,
        BLOCK_V: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        ptr = logits_ptr + row * stride
        target = tl.load(targets_ptr + row)
        valid = target != ignore_index
        # pass 1: running max and sum of exp over the row, in fp32
        m = float("-inf")
        s = 0.0
        for start in range(0, n_cols, BLOCK_V):
            cols = start + tl.arange(0, BLOCK_V)
            mask = cols < n_cols
            z = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
            z, _ = _softcap(z, cap, HAS_SOFTCAP)
            z = tl.where(mask, z, float("-inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
        lse = m + tl.log(s)
        safe_t = tl.where(valid, target, 0)
        z_t, _ = _softcap(tl.load(ptr + safe_t).to(tl.float32), cap, HAS_SOFTCAP)
        tl.store(loss_ptr + row, tl.where(valid, lse - z_t, 0.0))
        if COMPUTE_GRAD:
            # pass 2: softmax - onehot (times the softcap's derivative), over the logits in place
            for start in range(0, n_cols, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                mask = cols < n_cols
                z = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
                z, t = _softcap(z, cap, HAS_SOFTCAP)
                grad = tl.exp(z - lse) - tl.where(cols == safe_t, 1.0, 0.0)
                if HAS_SOFTCAP:
                    grad = grad * (1.0 - t * t)
                grad = tl.where(valid, grad, 0.0)
                tl.store(ptr + cols, grad.to(logits_ptr.dtype.element_ty), mask=mask)


def chunk_loss_and_grad_triton(
    logits: torch.Tensor, targets: torch.Tensor, softcap: float | None, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Same contract as the reference; the gradient overwrites `logits` (which must have unit column stride)."""
    n_rows, n_cols = logits.shape
    assert logits.stride(1) == 1, logits.stride()
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows:
        _chunk_loss_grad_kernel[(n_rows,)](
            logits,
            targets.contiguous(),
            losses,
            n_cols,
            logits.stride(0),
            float(softcap) if softcap is not None else 1.0,
            IGNORE_INDEX,
            HAS_SOFTCAP=softcap is not None,
            COMPUTE_GRAD=need_grad,
            BLOCK_V=min(4096, triton.next_power_of_2(n_cols)),
            num_warps=8,
        )
    return losses, (logits if need_grad else None)


_CHUNK_STEPS = {False: chunk_loss_and_grad_reference, True: chunk_loss_and_grad_triton}


LOGITS_BUFFER_BYTES = 512 * 2**20  # the [chunk, V] logits buffer's size; all saved activations are alive beside it


def chunk_tokens(vocab_size: int, element_size: int) -> int:
    """Tokens per chunk: as many as fit the logits buffer (a multiple of 256, between 256 and 4096). A fixed 4096
    made the buffer 2 GiB at Gemma's 256k vocabulary, the step's memory peak; 1024-token chunks still run the
    logits matmul near the GPU's full rate."""
    fit = LOGITS_BUFFER_BYTES // (vocab_size * element_size) // 256 * 256
    return max(256, min(4096, fit))


def _chunk_passes(hidden, weight, targets, softcap, chunk_size, fused, need_grad):
    """Per chunk of rows: (rows slice, hidden rows [C, H], token losses [C] fp32, d loss / d logits [C, V] in the
    hidden dtype or None). The gradient lives in one logits buffer shared by all chunks (the Triton step writes it
    over the logits), so it is valid only until the next chunk."""
    n = hidden.shape[0]
    step = _CHUNK_STEPS[fused]
    buf = torch.empty(min(chunk_size, n), weight.shape[0], dtype=hidden.dtype, device=hidden.device)
    for start in range(0, n, chunk_size):
        h = hidden[start : start + chunk_size]  # [C, H]
        logits = torch.mm(h, weight.t(), out=buf[: h.shape[0]])  # [C, V]
        losses, grad = step(logits, targets[start : start + chunk_size], softcap, need_grad)
        yield slice(start, start + h.shape[0]), h, losses, (grad.to(hidden.dtype) if need_grad else None)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """Chunked loss whose gradients are computed in forward; backward only scales them by the incoming gradient."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk_size, fused):
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        passes = _chunk_passes(hidden, weight, targets, softcap, chunk_size, fused, need_h or need_w)
        for rows, h, losses, grad in passes:
            total += losses.sum()
            if need_h:
                torch.mm(grad, weight, out=grad_hidden[rows])
            if need_w:
                grad_weight += (grad.t() @ h).float()
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_hidden, grad_weight)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_out.to(grad_hidden.dtype) if grad_hidden is not None else None
        gw = (grad_weight * grad_out).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None, None


class LinearTokenLogpsFunction(torch.autograd.Function):
    """Chunked per-token log-probabilities. Forward keeps d(-logp_i) / d hidden_i, row by row ([N, H], hidden
    dtype); backward scales each row by its incoming gradient. The head weight's gradient, sum_i g_i * d logp_i / dW,
    needs every g_i first, so backward computes it in a second pass over the chunks."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk_size, fused):
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        logps = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)  # [N]
        grad_rows = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        for rows, _, losses, grad in _chunk_passes(hidden, weight, targets, softcap, chunk_size, fused, need_h):
            torch.neg(losses, out=logps[rows])
            if need_h:
                torch.mm(grad, weight, out=grad_rows[rows])  # d token loss / d hidden = -d logp / d hidden
        ctx.args = (softcap, chunk_size, fused)
        ctx.save_for_backward(grad_rows, hidden if need_w else None, weight if need_w else None, targets)
        return logps

    @staticmethod
    def backward(ctx, grad_out):
        grad_rows, hidden, weight, targets = ctx.saved_tensors
        neg_g = -grad_out  # [N] fp32: the saved rows and the recomputed gradients are of the token loss, -logp
        gh = grad_rows * neg_g.to(grad_rows.dtype)[:, None] if grad_rows is not None else None
        gw = None
        if weight is not None:
            gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            for rows, h, _, grad in _chunk_passes(hidden, weight, targets, *ctx.args, need_grad=True):
                gw += (grad.t() @ (h * neg_g[rows].to(h.dtype)[:, None])).float()  # [V, H]
            gw = gw.to(weight.dtype)
        return gh, gw, None, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Sum over tokens of cross-entropy(hidden @ weight.T, targets), fp32 scalar. hidden [N, H], weight [V, H].

    The per-chunk softmax and gradient run in Triton on CUDA, in PyTorch elsewhere. chunk_size defaults to
    chunk_tokens(V, element size).
    """
    chunk_size = chunk_size or chunk_tokens(weight.shape[0], hidden.element_size())
    fused = use_triton(hidden, weight, targets)
    if not fused:
        reference_notice("chunked cross-entropy", no_triton_reason(), hidden)
    if not (hidden.requires_grad or weight.requires_grad) and not fused:
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            total += linear_cross_entropy_reference(
                hidden[start : start + chunk_size], weight, targets[start : start + chunk_size], softcap
            )
        return total
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, softcap, chunk_size, fused)


def linear_token_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """log_softmax(hidden @ weight.T)[i, targets[i]] as fp32 [N], 0 where targets[i] is IGNORE_INDEX; hidden [N, H],
    weight [V, H]. Differentiable w.r.t. hidden and weight without materialising the logits.

    With hidden requiring grad, forward keeps an [N, H] tensor in hidden's dtype (the per-token gradient rows);
    with weight requiring grad, backward runs the chunked logits matmul again. Triton on CUDA, PyTorch elsewhere;
    chunk_size defaults to chunk_tokens(V, element size). -linear_token_logps(...).sum() is linear_cross_entropy.
    """
    chunk_size = chunk_size or chunk_tokens(weight.shape[0], hidden.element_size())
    fused = use_triton(hidden, weight, targets)
    if not fused:
        reference_notice("chunked token log-probabilities", no_triton_reason(), hidden)
    return LinearTokenLogpsFunction.apply(hidden, weight, targets, softcap, chunk_size, fused)
