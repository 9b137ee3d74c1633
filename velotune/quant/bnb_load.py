"""bitsandbytes 4-bit checkpoints: find their layers, read them into Linear4bit as stored, and write ours back.

Pre-quantized Hub models (`*-bnb-4bit`) store each 4-bit linear as flat safetensors keys under the layer's name.
Reading them keeps the stored codes (no re-quantization, so outputs match what bitsandbytes computes), and writing
uses the same keys, so a model velotune quantized loads in transformers + bitsandbytes. One key table serves both
directions. The format itself (packing, double quantization) is described in quant/nf4.py.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from velotune.errors import ModelLoadError
from velotune.quant.nf4 import BLOCKSIZES, NF4_CODE_VALUES, Linear4bit, NF4Weight

# NF4Weight field -> key under the layer prefix, as bitsandbytes' Linear4bit names them in a state dict.
BNB_4BIT_KEYS = {
    "packed": "weight",
    "absmax": "weight.absmax",
    "code": "weight.quant_map",
    "nested_absmax": "weight.nested_absmax",
    "nested_code": "weight.nested_quant_map",
}
QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__"  # + quant type: "nf4" or "fp4"
_NESTED_FIELDS = ("nested_absmax", "nested_code")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def bnb_4bit_layers(keys: Iterable[str]) -> dict[str, str]:
    """Module names of the bitsandbytes 4-bit layers in a state dict's keys, with their quant type ("nf4"/"fp4")."""
    layers = {}
    for key in keys:
        head, sep, quant_type = key.rpartition(QUANT_STATE_KEY)
        if sep and not quant_type.count("."):
            layers[head.removesuffix(".")] = quant_type
    return layers


def _layer_name(prefix: str) -> str:
    return prefix.removesuffix(".") or "<root>"


def _read_quant_state(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict:
    """The json metadata bitsandbytes packs into a uint8 tensor; errors name the layer and what to do."""
    layer = _layer_name(prefix)
    found = {k.removeprefix(prefix) for k in tensors if k.startswith(prefix + QUANT_STATE_KEY)}
    if not found:
        raise ModelLoadError(
            f"{layer}: no '{QUANT_STATE_KEY}nf4' key, so this layer is not a bitsandbytes 4-bit layer; expected "
            f"the keys {sorted(BNB_4BIT_KEYS.values())} plus that quant state. Load it as a 16-bit weight instead."
        )
    if found != {QUANT_STATE_KEY + "nf4"}:
        kinds = sorted(k.removeprefix(QUANT_STATE_KEY) for k in found)
        raise ModelLoadError(
            f"{layer}: bitsandbytes 4-bit layer of type {', '.join(kinds)}; velotune reads nf4 only. Use the "
            f"model's 16-bit checkpoint and quantize it with velotune (method 'nf4'), or an nf4 checkpoint."
        )
    raw = tensors[prefix + QUANT_STATE_KEY + "nf4"]
    try:
        state = json.loads(bytes(raw.detach().cpu().to(torch.uint8).tolist()).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(
            f"{layer}: '{QUANT_STATE_KEY}nf4' is not bitsandbytes' packed json quant state ({e}); the checkpoint "
            "may be damaged or written by another tool. Re-download it or quantize the 16-bit model instead."
        ) from e
    if not isinstance(state, dict):
        raise ModelLoadError(f"{layer}: quant state json is a {type(state).__name__}, expected an object")
    return state


def _expect(cond: bool, layer: str, found: str, expected: str) -> None:
    if not cond:
        raise ModelLoadError(
            f"{layer}: {found}, expected {expected}. This bitsandbytes 4-bit layout is not one velotune reads; "
            "use the model's 16-bit checkpoint and quantize it with velotune (method 'nf4')."
        )


def nf4_from_bnb(tensors: Mapping[str, torch.Tensor], prefix: str = "") -> NF4Weight:
    """The NF4Weight stored under `prefix` ("model.layers.0.mlp.up_proj.", or "") in bitsandbytes' keys, as stored."""
    layer = _layer_name(prefix)
    state = _read_quant_state(tensors, prefix)
    _expect(state.get("quant_type") == "nf4", layer, f"quant_type {state.get('quant_type')!r}", "'nf4'")
    blocksize, shape, dtype = state.get("blocksize"), state.get("shape"), state.get("dtype")
    _expect(blocksize in BLOCKSIZES, layer, f"blocksize {blocksize!r}", f"one of {BLOCKSIZES}")
    _expect(dtype in _DTYPES, layer, f"dtype {dtype!r}", f"one of {sorted(_DTYPES)}")
    _expect(
        isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d > 0 for d in shape),
        layer,
        f"shape {shape!r}",
        "a 2-D [out, in] linear weight",
    )
    double_quant = "nested_offset" in state
    needed = [f for f in BNB_4BIT_KEYS if double_quant or f not in _NESTED_FIELDS]
    missing = [prefix + BNB_4BIT_KEYS[f] for f in needed if prefix + BNB_4BIT_KEYS[f] not in tensors]
    known = {prefix + k for k in BNB_4BIT_KEYS.values()} | {prefix + QUANT_STATE_KEY + "nf4"}
    unexpected = sorted(k for k in tensors if k.startswith(prefix + "weight.") and k not in known)
    _expect(not missing, layer, f"missing keys {missing}", "all of the layer's quant state tensors")
    _expect(not unexpected, layer, f"unexpected keys {unexpected}", f"only {sorted(known)}")

    t = {f: tensors[prefix + BNB_4BIT_KEYS[f]] for f in needed}
    n = shape[0] * shape[1]
    n_blocks = -(-n // blocksize)
    packed = t["packed"].contiguous().reshape(-1).view(torch.uint8).unsqueeze(1)  # any quant_storage dtype as bytes
    _expect(packed.numel() == (n + 1) // 2, layer, f"{packed.numel()} packed bytes", f"{(n + 1) // 2} for {shape}")
    _expect(
        torch.allclose(t["code"].float().cpu(), torch.tensor(NF4_CODE_VALUES), atol=1e-6),
        layer,
        "a quant_map that differs from the NF4 table",
        "the 16 NF4 values",
    )
    fields = {"packed": packed, "code": t["code"].float()}
    if double_quant:
        nested_blocksize = state.get("nested_blocksize")
        _expect(nested_blocksize in BLOCKSIZES, layer, f"nested_blocksize {nested_blocksize!r}", f"one of {BLOCKSIZES}")
        _expect(state.get("nested_dtype") == "float32", layer, f"nested_dtype {state.get('nested_dtype')!r}", "float32")
        n_groups = -(-n_blocks // nested_blocksize)
        absmax, nested_absmax, nested_code = t["absmax"], t["nested_absmax"], t["nested_code"]
        _expect(
            absmax.dtype == torch.uint8 and absmax.numel() == n_blocks,
            layer,
            f"absmax {absmax.dtype} with {absmax.numel()} values",
            f"uint8 with {n_blocks}",
        )
        _expect(nested_absmax.numel() == n_groups, layer, f"{nested_absmax.numel()} nested_absmax", f"{n_groups}")
        _expect(nested_code.numel() == 256, layer, f"{nested_code.numel()} nested_quant_map values", "256")
        offset = torch.tensor(float(state["nested_offset"]), dtype=torch.float32, device=absmax.device)
        fields |= {
            "absmax": absmax.reshape(-1),
            "nested_absmax": nested_absmax.reshape(-1).float(),
            "nested_code": nested_code.reshape(-1).float(),
            "offset": offset,
            "nested_blocksize": nested_blocksize,
        }
    else:
        absmax = t["absmax"]
        _expect(
            absmax.is_floating_point() and absmax.numel() == n_blocks,
            layer,
            f"absmax {absmax.dtype} with {absmax.numel()} values",
            f"float with {n_blocks}",
        )
        fields["absmax"] = absmax.reshape(-1).float()
    return NF4Weight(shape=torch.Size(shape), dtype=_DTYPES[dtype], blocksize=blocksize, **fields)


def nf4_to_bnb(w: NF4Weight, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes' Linear4bit would save for this weight, keyed under `prefix`."""
    state = {
        "quant_type": "nf4",
        "blocksize": w.blocksize,
        "dtype": str(w.dtype).removeprefix("torch."),
        "shape": list(w.shape),
    }
    if w.double_quant:
        state |= {"nested_blocksize": w.nested_blocksize, "nested_dtype": "float32", "nested_offset": w.offset.item()}
    out = {prefix + key: getattr(w, f) for f, key in BNB_4BIT_KEYS.items() if getattr(w, f) is not None}
    out[prefix + QUANT_STATE_KEY + "nf4"] = torch.tensor(list(json.dumps(state).encode("utf-8")), dtype=torch.uint8)
    return out


def bnb_state_dict(layer: Linear4bit, prefix: str = "") -> dict[str, torch.Tensor]:
    """A Linear4bit's state dict under bitsandbytes' key names (weight, weight.absmax, ..., bias)."""
    out = nf4_to_bnb(layer.nf4, prefix)
    if layer.bias is not None:
        out[prefix + "bias"] = layer.bias.detach()
    return out


def from_bnb_state_dict(
    tensors: Mapping[str, torch.Tensor], prefix: str = "", compute_dtype: torch.dtype = torch.bfloat16
) -> Linear4bit:
    """A Linear4bit from one layer's bitsandbytes nf4 tensors (and `bias` if present), with no re-quantization."""
    return Linear4bit(nf4_from_bnb(tensors, prefix), tensors.get(prefix + "bias"), compute_dtype)


def load_bnb_4bit_layers(
    model: nn.Module, tensors: Mapping[str, torch.Tensor], compute_dtype: torch.dtype = torch.bfloat16
) -> list[str]:
    """Replace each nn.Linear of `model` that `tensors` stores in bitsandbytes 4-bit with a Linear4bit read from it.

    Returns the replaced module names; the checkpoint's other tensors are the caller's to load.
    """
    names = sorted(bnb_4bit_layers(tensors))
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError as e:
            raise ModelLoadError(
                f"checkpoint has a 4-bit layer '{name}' but the model has no such module; check that the checkpoint "
                "and the model config are the same architecture"
            ) from e
        if not isinstance(module, nn.Linear | Linear4bit):
            raise ModelLoadError(
                f"checkpoint stores '{name}' as a 4-bit linear, but the model's '{name}' is a "
                f"{type(module).__name__}; expected torch.nn.Linear. Check the model config matches the checkpoint."
            )
        new = from_bnb_state_dict(tensors, name + ".", compute_dtype)
        if (new.out_features, new.in_features) != (module.out_features, module.in_features):
            raise ModelLoadError(
                f"{name}: checkpoint weight is [{new.out_features}, {new.in_features}], the model expects "
                f"[{module.out_features}, {module.in_features}]; check the model config matches the checkpoint"
            )
        if (new.bias is None) != (module.bias is None):
            found = "no bias" if new.bias is None else "a bias"
            raise ModelLoadError(
                f"{name}: checkpoint has {found} but the model's layer {'has' if module.bias is not None else 'has no'}"
                " bias; check the model config (attention_bias / mlp_bias) matches the checkpoint"
            )
        model.set_submodule(name, new)
    return names
