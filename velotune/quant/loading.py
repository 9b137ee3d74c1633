"""Quantize while loading: each linear weight of the decoder layers becomes NF4 / int8 / FP8 as it is read, and
bitsandbytes 4-bit checkpoints (`*-bnb-4bit`) and FP8 checkpoints (quant_method "fp8") are read as stored. Peak
memory stays near the quantized size: no 16-bit copy of the whole model ever exists on the host or the GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from velotune.errors import QuantizationError
from velotune.models.decoder import ALL_PROJECTIONS, CausalLM
from velotune.models.families import check_dtype
from velotune.models.load import ModulePlacement, load_model
from velotune.quant.bnb_load import bnb_4bit_layers, from_bnb_state_dict
from velotune.quant.fp8 import LinearFP8, checkpoint_block_size, from_checkpoint, quantize_fp8, require_fp8_device
from velotune.quant.int8 import Linear8bit
from velotune.quant.nf4 import Linear4bit, quantize

METHODS = ("nf4", "int8", "fp8")
FP8_SCALE_KEY = ".weight_scale_inv"


def _layer_of(key: str) -> str:
    return key[: key.index(".weight")] if ".weight" in key else key.rpartition(".")[0]


class QuantizingHook:
    """A load_weights hook: quantizes target linears as they arrive, and assembles bnb 4-bit layers."""

    def __init__(
        self,
        method: str | None,
        compute_dtype: torch.dtype,
        device: torch.device | str,
        targets: tuple[str, ...] = ALL_PROJECTIONS,
        quantize_on: torch.device | str | None = None,
    ) -> None:
        if method is not None and method not in METHODS:
            raise QuantizationError(f"quantization {method!r} is not supported; choose one of: {', '.join(METHODS)}")
        self.method, self.compute_dtype, self.device, self.targets = method, compute_dtype, device, targets
        if method == "fp8":
            require_fp8_device(device)
        self.quantize_on = quantize_on or device  # e.g. quantize on the GPU, keep the result in host memory
        self.bnb: dict[str, set[str]] = {}  # layer -> the checkpoint keys it is stored under
        self.fp8: dict[str, set[str]] = {}  # layers stored in FP8 -> their checkpoint keys
        self.fp8_block: tuple[int, int] = (0, 0)
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.quantized: set[str] = set()

    def prepare(self, keys: list[str], hf_config: dict[str, Any] | None = None) -> None:
        """Learn which layers a checkpoint stores in bitsandbytes 4-bit (read before any tensor)."""
        layers = bnb_4bit_layers(keys)
        bad = sorted(n for n, t in layers.items() if t != "nf4")
        if bad:
            raise QuantizationError(f"layers {', '.join(bad[:3])} are bitsandbytes {layers[bad[0]]}; only nf4 loads")
        for layer in layers:
            self.bnb[layer] = {k for k in keys if k.startswith(layer + ".") and _layer_of(k) == layer}
        block = checkpoint_block_size(hf_config)
        if block is None:
            return
        if self.method not in (None, "fp8"):
            raise QuantizationError(
                f"the checkpoint is stored in FP8 (quantization_config.quant_method 'fp8'); load it with load_in_fp8 "
                f"(or no quantization: it loads as stored), not as {self.method}, or use its 16-bit checkpoint"
            )
        self.fp8_block = block
        for layer in (k.removesuffix(FP8_SCALE_KEY) for k in keys if k.endswith(FP8_SCALE_KEY)):
            self.fp8[layer] = {k for k in keys if k.startswith(layer + ".") and _layer_of(k) == layer}

    def _is_target(self, layer: str, tensor: torch.Tensor) -> bool:
        return (
            self.method is not None
            and tensor.dim() == 2
            and ".layers." in layer
            and layer.rpartition(".")[2] in self.targets
        )

    def __call__(self, name: str, tensor: torch.Tensor) -> list[tuple[str, Any]]:
        layer = _layer_of(name)
        if layer in self.fp8:
            return self._stored_fp8(layer, name, tensor)
        if layer in self.bnb:
            buf = self.pending.setdefault(layer, {})
            buf[name] = tensor
            if len(buf) < len(self.bnb[layer]):
                return []
            del self.pending[layer]
            module = from_bnb_state_dict(buf, layer + ".", self.compute_dtype).to(self.device)
            return [(layer, ModulePlacement(module, (layer + ".weight", layer + ".bias")))]
        if name.endswith(".bias") and self.method and layer.rpartition(".")[2] in self.targets:
            if layer not in self.quantized:
                self.pending.setdefault(layer, {})[name] = tensor  # joins its weight when that arrives
                return []
            return [(name, tensor)]
        if name.endswith(".weight") and self._is_target(layer, tensor):
            bias = self.pending.pop(layer, {}).get(layer + ".bias")
            module = self._quantize(tensor, bias)
            self.quantized.add(layer)
            return [(layer, ModulePlacement(module, (name,) + ((layer + ".bias",) if bias is not None else ())))]
        return [(name, tensor)]

    def _stored_fp8(self, layer: str, name: str, tensor: torch.Tensor) -> list[tuple[str, Any]]:
        """Hold a published FP8 layer's tensors until all have arrived, then place it as stored."""
        buf = self.pending.setdefault(layer, {})
        buf[name] = tensor
        if len(buf) < len(self.fp8[layer]):
            return []
        del self.pending[layer]
        module = from_checkpoint(buf, layer + ".", self.fp8_block, self.compute_dtype).to(self.device)
        return [(layer, ModulePlacement(module, tuple(sorted(k for k in buf if not k.endswith(FP8_SCALE_KEY)))))]

    def _quantize(self, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
        if self.method == "fp8":
            w8, scale, block = quantize_fp8(weight.to(self.quantize_on, self.compute_dtype))
            b = bias.to(self.device, self.compute_dtype) if bias is not None else None
            return LinearFP8(w8.to(self.device), scale.to(self.device), block, b, self.compute_dtype)
        if self.method == "nf4":
            w = weight.to(self.quantize_on, self.compute_dtype)
            b = bias.to(self.device, self.compute_dtype) if bias is not None else None
            return Linear4bit(quantize(w).to(self.device), b, self.compute_dtype)
        w = weight.to(self.device, self.compute_dtype)
        with torch.device("meta"):
            lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None)
        lin.weight = nn.Parameter(w, requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias.to(self.device, self.compute_dtype), requires_grad=False)
        return Linear8bit.from_linear(lin, self.compute_dtype)


def load_quantized(
    source: str | Path | None,
    method: str | None,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    with_tokenizer: bool = True,
    quantize_on: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[CausalLM, Any]:
    """(model, tokenizer) with decoder-layer linears in `method` (None: 16-bit, but bnb checkpoints still load).
    quantize_on: where NF4 quantization runs when that is not `device` (a GPU, for a model kept in host memory);
    progress: a loading bar for GGUF files."""
    hook = QuantizingHook(method, dtype, device, quantize_on=quantize_on)
    model, tok = load_model(source, dtype, device, hook=hook, with_tokenizer=with_tokenizer, progress=progress)
    if hook.pending:
        raise QuantizationError(
            f"incomplete 4-bit / FP8 layers in the checkpoint: {', '.join(sorted(hook.pending)[:3])}"
        )
    check_dtype(model.config, dtype)  # Gemma overflows in float16: ask for bfloat16
    model.quantization = method or ("nf4" if hook.bnb else "fp8" if hook.fp8 else None)
    return model, tok
