"""FP8 storage for frozen base weights: float8_e4m3fn with float32 scales, and the Linear that multiplies in FP8.

A weight [out, in] is stored as `weight` (float8_e4m3fn [out, in]) and `weight_scale_inv` (float32, one scale per
block of `block_size` = (rows, cols)), with W ~= weight * weight_scale_inv: the names and layout of the FP8
checkpoints DeepSeek-V3 and Qwen publish (transformers' `FineGrainedFP8Config`, quant_method "fp8"), so those load
as stored (quant/loading.py). Two granularities, one parameter (`granularity`):

- "channel" (the default): one scale per output channel, block (1, in), weight_scale_inv [out, 1];
- "block": 128 x 128 blocks, weight_scale_inv [ceil(out / 128), ceil(in / 128)], as published checkpoints are.

Per-channel is the default because it is about as accurate and is the faster matmul. e4m3 is a floating-point
format, so a row's outlier costs its other values no precision unless they fall 2^14.8 below it: measured on CPU
(tests/quant/test_fp8.py), the weight round-trip error per channel / per block is 0.0265 / 0.0264 (Gaussian
1024 x 4096), 0.0252 / 0.0257 (Student-t(3)), 0.0248 / 0.0263 (1% outlier input columns), and a tiny Llama's logits
error with weights and activations in FP8 is 0.061 / 0.056 (weights alone: 0.046 for both). Per-channel scales
factor out of the GEMM, so forward and backward run as cuBLAS's row-wise scaled matmul
(`torch._scaled_mm`) with no custom kernel, while 128 x 128 blocks need the Triton kernel of kernels/fp8_matmul.py.

Embeddings, norms, the LM head and LoRA weights stay 16-bit. The matmuls (kernels/fp8_matmul.py) quantize
activations and gradients per row on the fly; on CPU and on GPUs without FP8 the same numbers come from the
reference (quantize -> dequantize -> matmul).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from velotune.errors import ConfigError, QuantizationError
from velotune.kernels.fp8_matmul import (
    E4M3,
    FP8_MAX,
    MIN_CAPABILITY,
    dequantize_fp8,
    fp8_capable,
    fp8_grad_matmul,
    fp8_linear,
    fp8_matmul,
)
from velotune.models.frozen import FrozenQuantLinear, FrozenWeight

GRANULARITIES = ("channel", "block")
DEFAULT_GRANULARITY = "channel"
BLOCK = (128, 128)


def block_size_for(granularity: str, in_features: int) -> tuple[int, int]:
    """The (rows, cols) a scale covers: (1, in) per channel, (128, 128) per block."""
    if granularity not in GRANULARITIES:
        raise QuantizationError(f"FP8 granularity {granularity!r} is not supported; use one of {GRANULARITIES}")
    return (1, in_features) if granularity == "channel" else BLOCK


def quantize_fp8(w: torch.Tensor, granularity: str = DEFAULT_GRANULARITY) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """w [out, in] -> (float8_e4m3fn [out, in], float32 weight_scale_inv [ceil(out/b0), ceil(in/b1)], block)."""
    if w.dim() != 2 or not w.is_floating_point():
        raise QuantizationError(f"FP8 quantizes a 2-D float [out, in] weight; got shape {tuple(w.shape)}, {w.dtype}")
    rows, cols = w.shape
    b0, b1 = block = block_size_for(granularity, cols)
    n0, n1 = -(-rows // b0), -(-cols // b1)
    wf = F.pad(w.detach().float(), (0, n1 * b1 - cols, 0, n0 * b0 - rows))  # [n0 * b0, n1 * b1]
    blocks = wf.view(n0, b0, n1, b1)
    scale = blocks.abs().amax(dim=(1, 3)).div_(FP8_MAX[E4M3]).clamp_(min=1e-12)  # [n0, n1]
    q = (blocks / scale[:, None, :, None]).clamp_(-FP8_MAX[E4M3], FP8_MAX[E4M3]).to(E4M3)
    return q.view(n0 * b0, n1 * b1)[:rows, :cols].contiguous(), scale, block


def require_fp8_device(device: torch.device | str) -> None:
    """Refuse load_in_fp8 on a CUDA GPU without FP8 tensor cores, naming what it has (CPU runs the reference)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return
    if fp8_capable(device):
        return
    major, minor = torch.cuda.get_device_capability(device)
    raise ConfigError(
        f"load_in_fp8 needs a GPU with FP8 tensor cores (compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+: "
        f"Ada, Hopper or later); this {torch.cuda.get_device_name(device)} has compute capability {major}.{minor}. "
        "Use load_in_8bit or load_in_4bit on this GPU, or 16-bit weights."
    )


class FP8FrozenWeight(FrozenWeight):
    """An FP8 layer's weight as the LoRA Functions take it: `base_matmul(x)` and `base_grad_matmul(dy)` run the FP8
    matmuls (kernels/lora.py prefers them); called, it is dequantized (DoRA's norms and composition)."""

    layer: LinearFP8

    def base_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """x2 [N, in] @ W^T -> [N, out]."""
        layer = self.layer
        return fp8_matmul(x2, layer.weight, layer.weight_scale_inv, layer.block_size)

    def base_grad_matmul(self, dy: torch.Tensor) -> torch.Tensor:
        """dy [N, out] @ W -> [N, in]."""
        layer = self.layer
        return fp8_grad_matmul(dy, layer.weight, layer.weight_scale_inv, layer.block_size)


class LinearFP8(FrozenQuantLinear):
    """A frozen nn.Linear whose weight is float8_e4m3fn with float32 block scales; the bias stays in compute dtype.

    Frozen parameters `weight` and `weight_scale_inv` (the published checkpoints' names; parameters so that FSDP
    shards them). forward and backward multiply in FP8 (kernels/fp8_matmul.py).
    """

    def __init__(
        self,
        w8: torch.Tensor,
        scale_inv: torch.Tensor,
        block_size: tuple[int, int],
        bias: torch.Tensor | None = None,
        compute_dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        rows, cols = w8.shape if w8.dim() == 2 else (0, 0)
        grid = (-(-rows // block_size[0]), -(-cols // block_size[1]))
        if w8.dtype != E4M3 or w8.dim() != 2 or scale_inv.numel() != grid[0] * grid[1]:
            raise QuantizationError(
                f"LinearFP8 needs a float8_e4m3fn weight [out, in] and {grid[0]} x {grid[1]} scales for blocks of "
                f"{tuple(block_size)}; got weight {w8.dtype} {tuple(w8.shape)}, scales {tuple(scale_inv.shape)}"
            )
        self.out_features, self.in_features = rows, cols
        self.compute_dtype = compute_dtype
        self.block_size = (int(block_size[0]), int(block_size[1]))
        self.weight = nn.Parameter(w8, requires_grad=False)
        self.weight_scale_inv = nn.Parameter(scale_inv.float().reshape(grid), requires_grad=False)
        if bias is not None:
            bias = nn.Parameter(bias.detach().to(device=w8.device, dtype=compute_dtype), requires_grad=False)
        self.bias = bias

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, compute_dtype: torch.dtype = torch.bfloat16, granularity: str = DEFAULT_GRANULARITY
    ) -> LinearFP8:
        """Quantize an nn.Linear's weight to FP8 on its device; the bias is kept (frozen) in compute_dtype."""
        w8, scale, block = quantize_fp8(linear.weight, granularity)
        return cls(w8, scale, block, linear.bias, compute_dtype)

    @property
    def granularity(self) -> str:
        return "channel" if self.block_size == (1, self.in_features) else f"block {self.block_size}"

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight [out, in] in `dtype` (default: compute_dtype)."""
        return dequantize_fp8(self.weight, self.weight_scale_inv, self.block_size, dtype or self.compute_dtype)

    def frozen_weight(self, dtype: torch.dtype) -> FP8FrozenWeight:
        return FP8FrozenWeight(self, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., in] -> [..., out], FP8 matmuls in compute_dtype, returned in x's dtype."""
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = fp8_linear(x.to(self.compute_dtype), self.weight, self.weight_scale_inv, self.block_size, bias)
        return y.to(x.dtype)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        # fp8 is a floating dtype, so .float() / .to(dtype) would cast the stored weight: only the bias follows a
        # cast; the weight and its scales only move.
        probe = fn(torch.zeros((), dtype=torch.float32, device=self.weight.device))
        stored = (self.weight, self.weight_scale_inv)

        def move_stored(t: torch.Tensor) -> torch.Tensor:
            return t.to(probe.device) if any(t is s for s in stored) else fn(t)

        return nn.Module._apply(self, move_stored, recurse)

    def _device(self) -> torch.device:
        return self.weight.device

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8 e4m3 {self.granularity}"


def checkpoint_block_size(hf_config: dict | None) -> tuple[int, int] | None:
    """The weight block size of a published FP8 checkpoint (config.json `quantization_config`, quant_method "fp8"),
    None for a checkpoint that is not FP8; None block size means one scale per tensor, read as one block."""
    qc = (hf_config or {}).get("quantization_config") or {}
    if qc.get("quant_method") != "fp8":
        return None
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise QuantizationError(
            f"FP8 checkpoint with activation_scheme {qc['activation_scheme']!r}: velotune scales activations "
            "dynamically (per row) and reads 'dynamic' checkpoints only; use the model's 16-bit checkpoint"
        )
    if qc.get("scale_fmt", "float") != "float":
        raise QuantizationError(
            f"FP8 checkpoint with scale_fmt {qc['scale_fmt']!r}: velotune reads float32 weight_scale_inv only"
        )
    block = qc.get("weight_block_size")
    return (0, 0) if block is None else (int(block[0]), int(block[1]))


def from_checkpoint(
    tensors: dict[str, torch.Tensor], prefix: str, block: tuple[int, int], compute_dtype: torch.dtype
) -> LinearFP8:
    """A LinearFP8 from a published checkpoint's `weight`, `weight_scale_inv` (and `bias`) under `prefix`, as stored.
    block (0, 0): one scale for the whole tensor."""
    w8, scale = tensors[prefix + "weight"], tensors[prefix + "weight_scale_inv"]
    if w8.dtype != E4M3:
        raise QuantizationError(f"{prefix}weight is {w8.dtype}; FP8 checkpoints store float8_e4m3fn weights")
    if block == (0, 0):
        block = tuple(w8.shape)
    return LinearFP8(w8, scale, block, tensors.get(prefix + "bias"), compute_dtype)
