"""Swap a model's nn.Linear layers for frozen quantized ones (NF4, int8 or FP8) in place, and back.

Layers are replaced one at a time, each quantized on `device` and its 16-bit weight released before the next, so
memory on the device grows by the quantized size plus one layer. Embeddings and norms are not nn.Linear and stay in
their dtype; `lm_head` is skipped by default (it is often tied to the embedding and is the most quality-sensitive).
Shapes are not restricted: NF4 blocks run over the flattened weight, so in_features need not divide the blocksize.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from velotune.errors import QuantizationError
from velotune.models.frozen import FrozenQuantLinear
from velotune.quant.fp8 import LinearFP8
from velotune.quant.int8 import Linear8bit
from velotune.quant.nf4 import Linear4bit

QUANTIZERS: dict[str, Callable[[nn.Linear, torch.dtype], FrozenQuantLinear]] = {
    "nf4": Linear4bit.from_linear,
    "int8": Linear8bit.from_linear,
    "fp8": LinearFP8.from_linear,
}


def _matches(name: str, patterns: Iterable[str]) -> bool:
    """A module name matches a pattern equal to it or to its trailing dotted part ("lm_head", "mlp.down_proj")."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def _check_quantizable(name: str, module: nn.Module) -> None:
    if isinstance(module, FrozenQuantLinear):
        raise QuantizationError(
            f"layer '{name}' is already quantized ({type(module).__name__}); quantize a model once, or call "
            "dequantize_model first"
        )
    if type(module) is not nn.Linear:
        raise QuantizationError(
            f"layer '{name}' is a {type(module).__module__}.{type(module).__name__}; velotune quantizes "
            f"torch.nn.Linear layers only (embeddings and norms stay 16-bit). Add '{name}' to skip, or quantize "
            "before wrapping layers (LoRA adapters are added after quantization)."
        )


def _select(model: nn.Module, skip: set[str], targets: set[str] | None) -> list[str]:
    """Names of the layers to quantize, with every requested layer checked."""
    modules = dict(model.named_modules())
    if targets is None:
        names = [n for n, m in modules.items() if isinstance(m, nn.Linear) and not _matches(n, skip)]
    else:
        unmatched = [t for t in sorted(targets) if not any(_matches(n, [t]) for n in modules)]
        if unmatched:
            raise QuantizationError(
                f"quantize targets {unmatched} match no module of {type(model).__name__}; names are module paths "
                "or their last parts, e.g. 'q_proj' or 'model.layers.0.mlp.down_proj'"
            )
        names = [n for n in modules if n and _matches(n, targets) and not _matches(n, skip)]
    for n in names:
        _check_quantizable(n, modules[n])
    tied: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        tied.setdefault(id(p), []).append(pname)
    for n in names:
        shared = [p for p in tied[id(modules[n].weight)] if p != f"{n}.weight"]
        if shared:
            raise QuantizationError(
                f"layer '{n}' shares its weight with {shared} (tied weights); quantizing it would keep a 16-bit and "
                f"a quantized copy. Add '{n.rpartition('.')[2]}' to skip."
            )
    return names


def quantize_model(
    model: nn.Module,
    method: str = "nf4",
    compute_dtype: torch.dtype = torch.bfloat16,
    skip: set[str] | frozenset[str] = frozenset({"lm_head"}),
    progress: bool = True,
    *,
    targets: set[str] | None = None,
    device: torch.device | str | None = None,
) -> nn.Module:
    """Replace every nn.Linear (or only `targets`), except `skip`, with a frozen quantized layer, in place.

    method: "nf4" (Linear4bit, block 64, double-quantized absmax), "int8" (Linear8bit, per-row scale) or "fp8"
    (LinearFP8, float8_e4m3fn with a scale per output channel; FP8 matmuls).
    device: where each layer is quantized and left (default: where it is). progress shows a bar over the layers.
    """
    if method not in QUANTIZERS:
        raise QuantizationError(f"unknown quantization method {method!r}; use one of {sorted(QUANTIZERS)}")
    build = QUANTIZERS[method]
    names = _select(model, set(skip), targets)
    for name in tqdm(names, desc=f"quantize {method}", unit="layer", disable=not progress):
        linear = model.get_submodule(name)
        if device is not None:
            linear.to(device)
        try:
            quantized = build(linear, compute_dtype)
        except QuantizationError as e:
            raise QuantizationError(f"layer '{name}': {e}") from e
        quantized.train(linear.training)
        model.set_submodule(name, quantized)
        del linear
    if names:
        model.quantization = method  # what the model's users (planner, generation engine, logs) read
    return model


def dequantize_model(
    model: nn.Module, dtype: torch.dtype | None = None, kinds: tuple[type, ...] = (FrozenQuantLinear,)
) -> nn.Module:
    """Replace every quantized layer (of `kinds`) with an nn.Linear holding its dequantized weight (default: compute
    dtype). The weights are what the quantized model computed with (for merging adapters and export), frozen.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    for name in names:
        q = model.get_submodule(name)
        weight = q.dequantize(dtype)  # [out, in]
        linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if q.bias is not None:
            linear.bias = nn.Parameter(q.bias.detach().to(weight.dtype), requires_grad=False)
        linear.train(q.training)
        model.set_submodule(name, linear)
    return model
