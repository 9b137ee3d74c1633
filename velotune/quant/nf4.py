"""NF4 weight storage (4-bit NormalFloat, QLoRA) for frozen base weights, in bitsandbytes' serialized layout.

velotune owns this format rather than depending on bitsandbytes so that 4-bit training runs on CPU in CI and so that
our fused kernels can read the packed weight directly. The layout matches bitsandbytes' `Params4bit` byte for byte,
so pre-quantized Hub checkpoints load without re-quantization (quant/bnb_load.py) and ours load in bitsandbytes:

- the weight is flattened row-major and cut into blocks of `blocksize` (64) values; the last block may be short;
- each value becomes the index of the nearest of the 16 NF4 codes after dividing by its block's absmax;
- two indices per byte, first value in the high nibble: packed uint8 [(n + 1) // 2, 1];
- absmax is float32 [n_blocks], or with double quantization: offset = mean(absmax), and absmax - offset is
  quantized in groups of 256 blocks to uint8 indices into bitsandbytes' signed 8-bit dynamic code, with one float32
  absmax per group (nested_absmax).

Quantization rounds to the nearest code (ties to the lower code), as bitsandbytes' torch backend does.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from velotune.errors import QuantizationError
from velotune.kernels.nf4 import absmax_reference, dequantize_nf4
from velotune.kernels.nf4_matmul import nf4_gemv
from velotune.models.frozen import FrozenQuantLinear

# The 16 NF4 values: quantiles of N(0, 1) scaled to [-1, 1] with an exact zero (QLoRA, Dettmers et al. 2023, App. E).
NF4_CODE_VALUES = (
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
)

_NF4_ZERO = NF4_CODE_VALUES.index(0.0)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256


def nf4_code(device: torch.device | str | None = None) -> torch.Tensor:
    """The NF4 code table, float32 [16], ascending."""
    return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)


@functools.cache
def _dynamic_code_cpu() -> torch.Tensor:
    # Signed dynamic tree code (Dettmers 2015): for exponent e = 0..6, 2**e linear fraction steps, each the
    # midpoint of an even split of [0.1, 1], scaled by 10**(e - 6), both signs; plus 0 and 1. 127 + 127 + 2 = 256.
    values: list[float] = [0.0, 1.0]
    for e in range(7):
        edges = torch.linspace(0.1, 1.0, 2**e + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        scale = 10.0 ** (e - 6)
        values += (scale * mids).tolist() + ((-scale) * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


def dynamic_code(device: torch.device | str | None = None) -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic code, float32 [256], ascending: the code of the double-quantized absmax."""
    return _dynamic_code_cpu().to(device, copy=True)  # a copy per weight: safetensors refuses shared storage


def _nearest_code(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of an ascending code for each value of x (ties to the lower), as uint8."""
    midpoints = (code[:-1] + code[1:]) / 2  # [len(code) - 1]
    return torch.bucketize(x, midpoints, out_int32=True).to(torch.uint8)


def _blockwise_absmax_quantize(
    flat: torch.Tensor, code: torch.Tensor, blocksize: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize float32 [n] in blocks: (uint8 indices [n], float32 absmax [n_blocks])."""
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    blocks = F.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)  # [n_blocks, blocksize]
    absmax = blocks.abs().amax(dim=1)  # [n_blocks]
    inv = 1.0 / absmax.clamp(min=1e-38)  # all-zero blocks keep absmax 0 and quantize to the zero code
    scaled = (blocks * inv.view(n_blocks, 1)).clamp(-1.0, 1.0)
    return _nearest_code(scaled.reshape(-1)[:n], code), absmax


@dataclass(frozen=True, eq=False)
class NF4Weight:
    """A weight in NF4: the tensors bitsandbytes serializes, plus shape, dtype and block sizes.

    packed: uint8 [(n + 1) // 2, 1]; absmax: float32 [n_blocks], or uint8 [n_blocks] when double-quantized, then
    with nested_absmax float32 [ceil(n_blocks / 256)], nested_code float32 [256] and offset (0-d float32).
    dtype is the dtype the weight had before quantization (bitsandbytes records it; dequantize defaults to it).
    """

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    nested_absmax: torch.Tensor | None = None
    nested_code: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    nested_blocksize: int = NESTED_BLOCKSIZE

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def absmax_float(self) -> torch.Tensor:
        """Float32 absmax per block [n_blocks], with double quantization undone."""
        return absmax_reference(self.absmax, self.nested_absmax, self.nested_code, self.offset, self.nested_blocksize)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [*shape] in `dtype` (default: the dtype it was quantized from)."""
        return dequantize_nf4(
            self.packed,
            self.absmax,
            self.code,
            self.shape,
            dtype or self.dtype,
            self.nested_absmax,
            self.nested_code,
            self.offset,
            self.blocksize,
            self.nested_blocksize,
        )

    def to(self, device: torch.device | str) -> NF4Weight:
        """A copy with every tensor on `device`."""
        move = {k: getattr(self, k) for k in _TENSOR_FIELDS if getattr(self, k) is not None}
        return replace(self, **{k: t.to(device) for k, t in move.items()})


_TENSOR_FIELDS = ("packed", "absmax", "code", "nested_absmax", "nested_code", "offset")


def quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a float tensor of any shape to NF4 (on w's device); double_quant also quantizes the absmax."""
    if blocksize not in BLOCKSIZES:
        raise QuantizationError(f"NF4 blocksize {blocksize} is not supported; use one of {BLOCKSIZES} (64 is usual)")
    if not w.is_floating_point():
        raise QuantizationError(f"NF4 quantizes float weights; got dtype {w.dtype}. Pass the 16/32-bit weight.")
    if w.numel() == 0:
        raise QuantizationError(f"NF4 cannot quantize an empty tensor of shape {tuple(w.shape)}")
    flat = w.detach().reshape(-1).float()  # [n]
    code = nf4_code(w.device)
    idx, absmax = _blockwise_absmax_quantize(flat, code, blocksize)  # [n] uint8, [n_blocks] float32
    idx = F.pad(idx, (0, idx.numel() % 2), value=_NF4_ZERO)  # an odd count ends with the code of 0.0, as in bnb
    packed = ((idx[0::2] << 4) | idx[1::2]).unsqueeze(1)  # [(n + 1) // 2, 1]
    nf4 = NF4Weight(packed=packed, absmax=absmax, code=code, shape=w.shape, dtype=w.dtype, blocksize=blocksize)
    if not double_quant:
        return nf4
    offset = absmax.mean()  # 0-d
    nested_code = dynamic_code(w.device)
    q_absmax, nested_absmax = _blockwise_absmax_quantize(absmax - offset, nested_code, NESTED_BLOCKSIZE)
    return replace(nf4, absmax=q_absmax, nested_absmax=nested_absmax, nested_code=nested_code, offset=offset)


class Linear4bit(FrozenQuantLinear):
    """A frozen nn.Linear whose weight is stored in NF4; the bias stays in compute dtype.

    Frozen parameters `weight` (packed uint8, bitsandbytes' name and layout), `weight_absmax` and, with double
    quantization, `weight_nested_absmax` (FSDP shards them); buffers `weight_quant_map`, `weight_nested_quant_map`,
    `weight_nested_offset`. All are moved by `.to(device)` and saved by state_dict. Module attribute names cannot
    contain dots, so bitsandbytes' key names (`weight.absmax` ...) come from quant/bnb_load.py: `bnb_state_dict` and
    `from_bnb_state_dict`.
    """

    def __init__(self, nf4: NF4Weight, bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if len(nf4.shape) != 2:
            raise QuantizationError(f"Linear4bit needs a 2-D [out, in] weight; got shape {tuple(nf4.shape)}")
        self.out_features, self.in_features = nf4.shape
        self.compute_dtype = compute_dtype
        self.orig_dtype = nf4.dtype
        self.blocksize = nf4.blocksize
        self.nested_blocksize = nf4.nested_blocksize
        # the per-weight tensors are frozen parameters so that FSDP shards them (buffers would stay whole on every
        # process); the code books and the offset are tiny and stay buffers
        self.weight = nn.Parameter(nf4.packed, requires_grad=False)
        self.weight_absmax = nn.Parameter(nf4.absmax, requires_grad=False)
        self.register_buffer("weight_quant_map", nf4.code)
        nested = nf4.nested_absmax
        self.weight_nested_absmax = None if nested is None else nn.Parameter(nested, requires_grad=False)
        self.register_buffer("weight_nested_quant_map", nf4.nested_code)
        self.register_buffer("weight_nested_offset", nf4.offset)
        if bias is not None:
            bias = nn.Parameter(bias.detach().to(device=nf4.packed.device, dtype=compute_dtype), requires_grad=False)
        self.bias = bias

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        compute_dtype: torch.dtype = torch.bfloat16,
        blocksize: int = 64,
        double_quant: bool = True,
    ) -> Linear4bit:
        """Quantize an nn.Linear's weight to NF4 on its device; the bias is kept (frozen) in compute_dtype."""
        return cls(quantize(linear.weight, blocksize, double_quant), linear.bias, compute_dtype)

    @property
    def nf4(self) -> NF4Weight:
        """The stored weight as an NF4Weight (this module's tensors, on its current device)."""
        return NF4Weight(
            packed=self.weight,
            absmax=self.weight_absmax,
            code=self.weight_quant_map,
            shape=torch.Size((self.out_features, self.in_features)),
            dtype=self.orig_dtype,
            blocksize=self.blocksize,
            nested_absmax=self.weight_nested_absmax,
            nested_code=self.weight_nested_quant_map,
            offset=self.weight_nested_offset,
            nested_blocksize=self.nested_blocksize,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] in `dtype` (default: compute_dtype)."""
        return self.nf4.dequantize(dtype or self.compute_dtype)

    def small_matmul(self, x: torch.Tensor) -> torch.Tensor | None:
        """kernels/nf4_matmul's GEMV for at most MAX_ROWS rows on CUDA; None elsewhere."""
        return nf4_gemv(x, self.nf4)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, nf4 blocksize={self.blocksize}, double_quant={self.nf4.double_quant}"
