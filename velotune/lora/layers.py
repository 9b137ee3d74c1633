"""LoRA layers velotune owns, so the LoRA matmuls can be fused with the base projection.

y = base(x) + (dropout(x) @ A^T @ B^T) * scaling, with scaling = alpha / r (or alpha / sqrt(r) for rsLoRA).
The frozen base may be any linear module with in_features/out_features (nn.Linear, or a 4-/8-bit one from
velotune.quant). A and B are kept in fp32 (stable AdamW updates) and cast to the activation dtype in forward.
Parameter names follow PEFT's (base_layer, lora_A, lora_B) so adapters map one to one onto its files.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from velotune.kernels.lora import LoRAWeights, Weight, lora_linear
from velotune.quant.nf4 import FrozenQuantLinear


class LoRALinear(nn.Module):
    def __init__(
        self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha = r, alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        device = next(base_layer.buffers(), None)
        device = base_layer.weight.device if hasattr(base_layer, "weight") else device.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init; B = 0 so the start is exact
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.active = True  # False: the layer is its base alone (lora.apply.disable_adapters, a DPO reference)

    def forward(self, x: torch.Tensor, need_output: bool = True) -> torch.Tensor:
        """[..., in] -> [..., out] through kernels.lora.lora_linear, which saves no [..., out] tensor and never a
        dequantized base weight. Bases that are neither nn.Linear nor a quantized linear computing in x's dtype
        take the plain composition. need_output=False: see forward_for_backward."""
        if not self.active:
            return self.base_layer(x)
        x_lora = None if isinstance(self.dropout, nn.Identity) else self.dropout(x)
        frozen = self._frozen_base(x.dtype)
        if frozen is not None:
            weight, bias = frozen
            return lora_linear(x, weight, bias, self.lora_A, self.lora_B, self.scaling, x_lora, need_output)
        y = self.base_layer(x)  # [..., out]
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return y + ((x if x_lora is None else x_lora) @ a.t() @ b.t()) * self.scaling

    def _frozen_base(self, dtype: torch.dtype) -> tuple[Weight, torch.Tensor | None] | None:
        """(weight or a callable rebuilding it, bias in `dtype`) for the LoRA Functions, or None for a base that is
        neither nn.Linear nor a quantized linear computing in `dtype`."""
        base = self.base_layer
        if isinstance(base, nn.Linear):
            return base.weight, base.bias
        if isinstance(base, FrozenQuantLinear) and base.compute_dtype == dtype:
            bias = None if base.bias is None else base.bias.to(dtype)
            return base.frozen_weight(dtype), bias  # rebuilt again in backward
        return None

    def lora_weights(self, dtype: torch.dtype) -> LoRAWeights | None:
        """This projection for the fused LoRA MLP at activation dtype `dtype`, or None where it cannot take part
        (LoRA dropout, a base that is neither nn.Linear nor a quantized linear computing in `dtype`)."""
        if not isinstance(self.dropout, nn.Identity) or not self.active:
            return None
        frozen = self._frozen_base(dtype)
        return None if frozen is None else LoRAWeights(*frozen, self.lora_A, self.lora_B, self.scaling)

    def forward_for_backward(self, x: torch.Tensor) -> torch.Tensor:
        """forward() when only its backward will be used (a checkpoint recomputation): the base matmul is skipped
        and the returned value is uninitialised; gradients are those of forward()."""
        return self.forward(x, need_output=False)

    def delta_weight(self) -> torch.Tensor:
        """B @ A * scaling, [out, in] in fp32."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}"
