"""Chunked linear + cross-entropy: the loss of hidden states against a vocabulary projection without ever holding
the full [tokens x vocab] logits.

Tokens are processed in chunks; each chunk's logits live only inside the forward, where the gradient with respect
to the hidden states (and the head weight, if it trains) is computed right away and kept for backward. Peak extra
memory is one chunk of fp32 logits instead of all of them (4 GiB for 8k tokens x 128k vocab). Optional final-logit
soft-capping (Gemma 2) is applied inside. This is pure PyTorch and runs everywhere; the matmuls dominate, so it is
already close to the speed of a fused kernel.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, softcap: float | None = None
) -> torch.Tensor:
    """Sum of token losses. hidden [N, H], weight [V, H], targets [N] (IGNORE_INDEX skipped). Materialises logits."""
    logits = (hidden @ weight.t()).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, softcap, chunk_size):
        n = hidden.shape[0]
        need_w = weight.requires_grad
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_size):
            h = hidden[start : start + chunk_size]  # [C, H]
            t = targets[start : start + chunk_size]  # [C]
            logits = (h @ weight.t()).float()  # [C, V]
            if softcap is not None:
                capped = torch.tanh(logits / softcap)
                logits = softcap * capped
            valid = t != IGNORE_INDEX
            safe_t = t.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)  # [C]
            picked = logits.gather(1, safe_t[:, None]).squeeze(1)
            total += ((lse - picked) * valid).sum()
            # d loss / d logits = softmax - onehot, zero for ignored tokens
            grad = torch.softmax(logits, dim=-1)
            grad.scatter_add_(1, safe_t[:, None], -torch.ones_like(lse)[:, None])
            grad *= valid[:, None]
            if softcap is not None:
                grad *= 1 - capped * capped
            grad = grad.to(hidden.dtype)
            if grad_hidden is not None:
                grad_hidden[start : start + chunk_size] = grad @ weight
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
        return gh, gw, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    softcap: float | None = None,
    chunk_size: int = 4096,
) -> torch.Tensor:
    """Sum over tokens of cross-entropy(hidden @ weight.T, targets), fp32 scalar. hidden [N, H], weight [V, H]."""
    if not (hidden.requires_grad or weight.requires_grad):
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            total += linear_cross_entropy_reference(
                hidden[start : start + chunk_size], weight, targets[start : start + chunk_size], softcap
            )
        return total
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, softcap, chunk_size)
