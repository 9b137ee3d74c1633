"""An independent, straightforward NF4 implementation written from the format's description (not velotune's code):
block by block in numpy, nearest code by argmin of the distance, nibbles packed by hand, double quantization of the
absmax, and the tensors + json quant state under bitsandbytes' key names. Tests compare velotune against it, and
against bitsandbytes itself where that is installed (an optional, test-only reference)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

NF4 = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=np.float32,
)


def _dynamic_code() -> np.ndarray:
    # 8-bit signed dynamic tree code: exponents 10**-6 .. 10**0, 2**e fraction steps at exponent e. The fraction
    # grid comes from torch.linspace in float32, as bitsandbytes builds it (numpy's float64 linspace rounds
    # differently).
    vals = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32).numpy()
        mids = ((edges[:-1] + edges[1:]) / np.float32(2)).astype(np.float32)
        vals += list(np.float32(10.0 ** (e - 6)) * mids) + list(np.float32(-(10.0 ** (e - 6))) * mids)
    return np.sort(np.array(vals, dtype=np.float32))


def _blockwise(flat: np.ndarray, code: np.ndarray, blocksize: int) -> tuple[np.ndarray, np.ndarray]:
    idx, absmax = [], []
    for start in range(0, flat.size, blocksize):
        block = flat[start : start + blocksize]
        a = np.float32(np.abs(block).max())
        inv = np.float32(1.0) / a if a > 0 else np.float32(0.0)
        scaled = np.clip(block * inv, -1.0, 1.0).astype(np.float32)
        idx.append(np.argmin(np.abs(scaled[:, None] - code[None, :]), axis=1))  # first (lower) code on ties
        absmax.append(a)
    return np.concatenate(idx).astype(np.uint8), np.array(absmax, dtype=np.float32)


def spec_quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> dict:
    """The NF4 pieces of w as plain numpy/python values."""
    flat = w.detach().reshape(-1).float().numpy()
    idx, absmax = _blockwise(flat, NF4, blocksize)
    if idx.size % 2:
        idx = np.append(idx, np.uint8(7))  # pad nibble: the code of 0.0
    packed = np.array([(hi << 4) | lo for hi, lo in zip(idx[0::2], idx[1::2], strict=True)], dtype=np.uint8)
    out = {"packed": packed, "absmax": absmax, "shape": list(w.shape), "dtype": w.dtype, "blocksize": blocksize}
    if double_quant:
        offset = np.float32(torch.from_numpy(absmax).mean().item())  # the mean as torch computes it
        code2 = _dynamic_code()
        q2, nested = _blockwise((absmax - offset).astype(np.float32), code2, 256)
        out |= {"absmax": q2, "nested_absmax": nested, "nested_code": code2, "offset": offset}
    return out


def spec_dequantize(p: dict, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    n = int(np.prod(p["shape"]))
    idx = np.empty(p["packed"].size * 2, dtype=np.uint8)
    idx[0::2], idx[1::2] = p["packed"] >> 4, p["packed"] & 15
    absmax = p["absmax"]
    if "offset" in p:
        groups = np.arange(absmax.size) // 256
        absmax = (p["nested_code"][absmax] * p["nested_absmax"][groups] + p["offset"]).astype(np.float32)
    vals = NF4[idx[:n]] * absmax[np.arange(n) // p["blocksize"]]
    return torch.from_numpy(vals.astype(np.float32)).reshape(p["shape"]).to(dtype)


def spec_bnb_tensors(p: dict, prefix: str = "", bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The tensors bitsandbytes serializes for a 4-bit nf4 Linear weight, written from the format's spec."""
    state = {
        "quant_type": "nf4",
        "blocksize": p["blocksize"],
        "dtype": str(p["dtype"]).split(".")[-1],
        "shape": p["shape"],
    }
    t = {
        prefix + "weight": torch.from_numpy(p["packed"].copy()).reshape(-1, 1),
        prefix + "weight.absmax": torch.from_numpy(p["absmax"].copy()),
        prefix + "weight.quant_map": torch.from_numpy(NF4.copy()),
    }
    if "offset" in p:
        state |= {"nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": float(p["offset"])}
        t[prefix + "weight.nested_absmax"] = torch.from_numpy(p["nested_absmax"].copy())
        t[prefix + "weight.nested_quant_map"] = torch.from_numpy(p["nested_code"].copy())
    packed_state = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    t[prefix + "weight.quant_state.bitsandbytes__nf4"] = packed_state
    if bias is not None:
        t[prefix + "bias"] = bias.detach().clone()
    return t


@pytest.fixture
def nf4_spec() -> SimpleNamespace:
    return SimpleNamespace(
        code=NF4,
        dynamic_code=_dynamic_code,
        quantize=spec_quantize,
        dequantize=spec_dequantize,
        bnb_tensors=spec_bnb_tensors,
    )
