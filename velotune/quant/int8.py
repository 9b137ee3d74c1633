"""Int8 weight-only storage for frozen base weights: symmetric, one absmax scale per output row.

velotune owns this format (bitsandbytes is not a dependency) so 8-bit training runs on CPU in CI. The stored tensors
match bitsandbytes' `Linear8bitLt` state dict: `weight` int8 [out, in] = round(w * 127 / SCB) and `SCB` float32 [out],
the absmax of each row, so w ~= weight * SCB / 127. Unlike LLM.int8() there is no outlier decomposition and the
matmul runs in the compute dtype on the dequantized weight: this is weight storage, not int8 arithmetic.
"""

from __future__ import annotations

import torch
from torch import nn

from velotune.errors import QuantizationError
from velotune.models.frozen import FrozenQuantLinear


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise symmetric int8: w [out, in] -> (int8 [out, in], float32 row absmax SCB [out])."""
    if w.dim() != 2 or not w.is_floating_point():
        raise QuantizationError(f"int8 quantizes a 2-D float [out, in] weight; got shape {tuple(w.shape)}, {w.dtype}")
    wf = w.detach().float()
    scb = wf.abs().amax(dim=1)  # [out]
    inv = 127.0 / scb.clamp(min=1e-38)  # all-zero rows keep SCB 0 and quantize to 0
    q = torch.round(wf * inv.unsqueeze(1)).clamp(-127, 127).to(torch.int8)  # [out, in]
    return q, scb


def dequantize_int8(q: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [out, in] and row absmax [out] -> weight [out, in] in `dtype` (arithmetic in float32)."""
    return (q.float() * (scb.float() / 127.0).unsqueeze(1)).to(dtype)


class Linear8bit(FrozenQuantLinear):
    """A frozen nn.Linear whose weight is stored as int8 with a float32 scale per output row.

    Buffers: `weight` (int8 [out, in]) and `SCB` (float32 [out], row absmax), bitsandbytes' names; the bias stays in
    compute dtype. forward dequantizes to compute dtype; backward recomputes the weight instead of saving it.
    """

    def __init__(
        self,
        q: torch.Tensor,
        scb: torch.Tensor,
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        if q.dtype != torch.int8 or q.dim() != 2 or scb.shape != (q.shape[0],):
            raise QuantizationError(
                f"Linear8bit needs int8 weight [out, in] and SCB [out]; got weight {q.dtype} {tuple(q.shape)} and "
                f"SCB {tuple(scb.shape)}"
            )
        self.out_features, self.in_features = q.shape
        self.compute_dtype = compute_dtype
        self.register_buffer("weight", q)
        self.register_buffer("SCB", scb.float())
        if bias is not None:
            bias = nn.Parameter(bias.detach().to(device=q.device, dtype=compute_dtype), requires_grad=False)
        self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16) -> Linear8bit:
        """Quantize an nn.Linear's weight to row-wise int8 on its device; the bias is kept (frozen) in compute_dtype."""
        q, scb = quantize_int8(linear.weight)
        return cls(q, scb, linear.bias, compute_dtype)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] in `dtype` (default: compute_dtype)."""
        return dequantize_int8(self.weight, self.SCB, dtype or self.compute_dtype)
