"""LoRA and DoRA layers velotune owns, so the adapter matmuls can be fused with the base projection.

LoRA: y = base(x) + (dropout(x) @ A^T @ B^T) * scaling, with scaling = alpha / r (or alpha / sqrt(r) for rsLoRA).
DoRA (use_dora): y = m / ||W + scaling B A|| * (x W^T + scaling (x A^T) B^T) + b, the row norm detached, with a
trainable magnitude m [out] that starts at ||W|| per row (PEFT's `use_dora`, dropout as PEFT: kernels/lora.py).
The frozen base may be any linear module with in_features/out_features (nn.Linear, or a 4-/8-bit one from
velotune.quant; DoRA needs one of those, whose weight it reads). A, B and m are kept in fp32 (stable AdamW updates)
and cast to the activation dtype in forward. Parameter names follow PEFT's (base_layer, lora_A, lora_B,
lora_magnitude_vector) so adapters map one to one onto its files.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from velotune.errors import ConfigError
from velotune.kernels.lora import LoRAWeights, Weight, dora_linear, dora_linear_reference, lora_linear
from velotune.models.frozen import FrozenQuantLinear


def _row_sq_norm(w: torch.Tensor, rows: int = 4096) -> torch.Tensor:
    """||w||^2 per row, [out] fp32, `rows` rows at a time (no fp32 copy of the whole weight)."""
    return torch.cat([w[i : i + rows].float().square().sum(1) for i in range(0, w.shape[0], rows)])


class LoRALinear(nn.Module):
    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
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
        self._sq_norm: tuple[tuple, torch.Tensor] | None = None  # (base tensors' identity, ||W||^2 per row)
        if use_dora:
            if not isinstance(base_layer, (nn.Linear, FrozenQuantLinear)):
                raise ConfigError(
                    f"use_dora needs an nn.Linear or quantized linear base layer (it reads the weight's row norms); "
                    f"got {type(base_layer).__name__}. Use plain LoRA (use_dora: false) for this layer."
                )
            # m = ||W|| per row, from the same cached sum as the forward's norm: with B = 0 the start is exact
            self.lora_magnitude_vector = nn.Parameter(self.weight_sq_norm().sqrt())
        else:
            self.register_parameter("lora_magnitude_vector", None)

    @property
    def use_dora(self) -> bool:
        return self.lora_magnitude_vector is not None

    def forward(self, x: torch.Tensor, need_output: bool = True) -> torch.Tensor:
        """[..., in] -> [..., out] through kernels.lora.lora_linear (dora_linear), which saves no [..., out] tensor
        (DoRA: one, its unscaled output) and never a dequantized base weight. Bases that are neither nn.Linear nor
        a quantized linear computing in x's dtype take the plain composition. need_output=False: see
        forward_for_backward (DoRA computes the output anyway: its magnitude's gradient needs it)."""
        if not self.active:
            return self.base_layer(x)
        x_lora = None if isinstance(self.dropout, nn.Identity) else self.dropout(x)
        frozen = self._frozen_base(x.dtype)
        if self.use_dora:
            return self._dora_forward(x, x_lora, frozen)
        if frozen is not None:
            weight, bias = frozen
            return lora_linear(x, weight, bias, self.lora_A, self.lora_B, self.scaling, x_lora, need_output)
        y = self.base_layer(x)  # [..., out]
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        return y + ((x if x_lora is None else x_lora) @ a.t() @ b.t()) * self.scaling

    def _dora_forward(
        self, x: torch.Tensor, x_lora: torch.Tensor | None, frozen: tuple[Weight, torch.Tensor | None] | None
    ) -> torch.Tensor:
        a, b, m = self.lora_A, self.lora_B, self.lora_magnitude_vector
        if frozen is None:  # a quantized base computing in another dtype: the composition, its weight in x's dtype
            base = self.base_layer
            bias = None if base.bias is None else base.bias.to(x.dtype)
            return dora_linear_reference(x, base.dequantize(x.dtype), bias, a, b, self.scaling, m, x_lora)
        weight, bias = frozen
        return dora_linear(x, weight, bias, a, b, self.scaling, m, self.weight_sq_norm(), x_lora)

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

    def weight_sq_norm(self) -> torch.Tensor:
        """||W||^2 per output row, [out] fp32, of the weight the forward multiplies by (a quantized base: dequantized
        to its compute dtype). W is frozen, so this is computed once, and again only when the base's tensors are
        replaced, changed in place or moved."""
        base = self.base_layer
        key = tuple((id(t), t._version, t.device) for t in base.parameters())
        if self._sq_norm is None or self._sq_norm[0] != key:
            w = base.dequantize(base.compute_dtype) if isinstance(base, FrozenQuantLinear) else base.weight
            with torch.no_grad():
                self._sq_norm = (key, _row_sq_norm(w.detach()))
        return self._sq_norm[1]

    def lora_weights(self, dtype: torch.dtype) -> LoRAWeights | None:
        """This projection for the fused LoRA MLP at activation dtype `dtype`, or None where it cannot take part
        (adapter dropout, a base that is neither nn.Linear nor a quantized linear computing in `dtype`)."""
        if not isinstance(self.dropout, nn.Identity) or not self.active:
            return None
        frozen = self._frozen_base(dtype)
        if frozen is None:
            return None
        dora = (self.lora_magnitude_vector, self.weight_sq_norm()) if self.use_dora else (None, None)
        return LoRAWeights(*frozen, self.lora_A, self.lora_B, self.scaling, *dora)

    def forward_for_backward(self, x: torch.Tensor) -> torch.Tensor:
        """forward() when only its backward will be used (a checkpoint recomputation): the base matmul is skipped
        and the returned value is uninitialised; gradients are those of forward()."""
        return self.forward(x, need_output=False)

    def delta_weight(self) -> torch.Tensor:
        """B @ A * scaling, [out, in] in fp32."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """The base weight with the adapter folded in, [out, in] fp32: W + B A * scaling, and for DoRA that times
        m / ||W + B A * scaling|| per row (PEFT's merge). The bias is unchanged."""
        base = self.base_layer
        weight = base.dequantize() if isinstance(base, FrozenQuantLinear) else base.weight
        with torch.no_grad():
            merged = weight.float() + self.delta_weight()  # [out, in]
            if self.use_dora:
                norm = torch.linalg.vector_norm(merged, dim=1)  # [out]
                merged *= (self.lora_magnitude_vector.float() / norm).unsqueeze(1)
        return merged

    def extra_repr(self) -> str:
        dora = ", dora" if self.use_dora else ""
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}{dora}"
