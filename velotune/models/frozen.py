"""Frozen base linears whose weight is stored in another form (NF4, int8, FP8) and rebuilt or multiplied on demand.

The shared behaviour lives here, beside the decoder, because the decoder, the LoRA layers and the distributed setup
all recognise these layers: `FrozenQuantLinear` (forward in compute dtype, statistics kept float32 under casts),
`FrozenWeightLinear` (backward rebuilds the weight instead of saving it) and `FrozenWeight` (the weight as the LoRA
Functions take it). Each storage format subclasses FrozenQuantLinear in velotune/quant.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class FrozenWeightLinear(torch.autograd.Function):
    """y = x @ W.T + b for a frozen W rebuilt by `weight_fn()`; backward rebuilds W instead of saving it.

    Used by Linear4bit and Linear8bit so activations for backward cost no 16-bit copy of the weight.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, bias: torch.Tensor | None, weight_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        ctx.weight_fn = weight_fn
        ctx.has_bias = bias is not None
        return F.linear(x, weight_fn(), bias)  # [..., in] -> [..., out]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ ctx.weight_fn()  # [..., out] @ [out, in] -> [..., in]
        if ctx.has_bias and ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)  # [out]
        return grad_x, grad_bias, None


class FrozenWeight:
    """A quantized layer's frozen weight as the LoRA Functions take it: called, it is rebuilt in `dtype` ([out, in]);
    `small_matmul(x)` multiplies by it without rebuilding it where the storage has a kernel for few rows."""

    def __init__(self, layer: FrozenQuantLinear, dtype: torch.dtype) -> None:
        self.layer, self.dtype = layer, dtype

    def __call__(self) -> torch.Tensor:
        return self.layer.dequantize(self.dtype)

    def small_matmul(self, x: torch.Tensor) -> torch.Tensor | None:
        return self.layer.small_matmul(x)


class FrozenQuantLinear(nn.Module):
    """Shared behaviour of quantized linears: compute-dtype forward through FrozenWeightLinear, bias in compute
    dtype, and quantization statistics that stay float32 when the module is cast with `.to(dtype)` / `.half()`."""

    in_features: int
    out_features: int
    compute_dtype: torch.dtype
    bias: nn.Parameter | None

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        raise NotImplementedError

    def small_matmul(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [..., in] @ W.T without materialising W where this storage has a kernel for few rows (decode steps);
        None elsewhere."""
        return None

    def frozen_weight(self, dtype: torch.dtype) -> FrozenWeight:
        """This weight as the LoRA Functions take it (kernels/lora.py)."""
        return FrozenWeight(self, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in] -> [..., out], computed in compute_dtype, returned in x's dtype."""
        dtype = self.compute_dtype
        bias = None if self.bias is None else self.bias.to(dtype)
        xc = x.to(dtype)
        if not (torch.is_grad_enabled() and xc.requires_grad):
            y = self.small_matmul(xc)
            if y is not None:
                return (y if bias is None else y + bias).to(x.dtype)
        y = FrozenWeightLinear.apply(xc, bias, functools.partial(self.dequantize, dtype))
        return y.to(x.dtype)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        # A dtype cast (module.to(bf16), .half()) must not round the float32 statistics of the quantized weight;
        # device moves apply to everything. The bias follows the cast like any parameter.
        probe = fn(torch.zeros((), dtype=torch.float32, device=self._device()))
        if probe.dtype == torch.float32:
            return super()._apply(fn, recurse)
        bias = self.bias

        def cast_bias_move_rest(t: torch.Tensor) -> torch.Tensor:
            return fn(t) if t is bias else t.to(probe.device)

        return super()._apply(cast_bias_move_rest, recurse)

    def _device(self) -> torch.device:
        return next(self.buffers()).device

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"compute_dtype={self.compute_dtype}"
        )
