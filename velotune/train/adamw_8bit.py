"""AdamW with its two moment estimates stored in 8 bits, blockwise (`optim: adamw_8bit`).

Why our own: AdamW keeps two fp32 states per trained parameter (8 bytes), which for full or partial fine-tuning is
more memory than the bf16 weights themselves. Storing them in 8 bits with one fp32 scale per block of BLOCK values
cuts that to ~2.03 bytes. bitsandbytes does this with CUDA-only binaries built per CUDA/torch version; this is a
few lines of plain torch that run on any device (CPU tests included), at the cost of a few extra elementwise passes
per step, which matter little next to the forward and backward of the model. For LoRA the states are small anyway.

Quantization, per block of BLOCK values with absmax `a` (fp32):
- first moment m (signed):   code = round(127 * sign(m) * sqrt(|m| / a)),   int8;  m ~ sign(code) (code/127)^2 a
- second moment v (>= 0):    code = round(255 * (v / a) ** (1/4)),           uint8; v ~ (code/255)^4 a
The square and fourth-root companding keep relative precision for values far below the block's largest (small
second moments must not round to zero, or m / sqrt(v) would explode). Each step dequantizes, updates in fp32 exactly
as torch.optim.AdamW does, and quantizes again. Parameters under MIN_8BIT_SIZE values (norms, biases) keep fp32
states.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

BLOCK = 256
MIN_8BIT_SIZE = 4096


def _blocks(x: torch.Tensor) -> torch.Tensor:
    flat = x.reshape(-1).float()
    return F.pad(flat, (0, -flat.numel() % BLOCK)).view(-1, BLOCK)  # [n_blocks, BLOCK]


def quantize_signed(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape) -> (int8 codes [n_blocks * BLOCK], fp32 absmax [n_blocks])."""
    blocks = _blocks(x)
    absmax = blocks.abs().amax(dim=1)
    unit = blocks / absmax.clamp(min=1e-38)[:, None]  # [-1, 1]
    codes = torch.round(unit.sign() * unit.abs().sqrt() * 127).to(torch.int8)
    return codes.reshape(-1), absmax


def dequantize_signed(codes: torch.Tensor, absmax: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    unit = codes.view(-1, BLOCK).float() / 127
    return (unit * unit.abs() * absmax[:, None]).reshape(-1)[: like.numel()].view(like.shape)


def quantize_unsigned(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x >= 0 (any shape) -> (uint8 codes [n_blocks * BLOCK], fp32 absmax [n_blocks])."""
    blocks = _blocks(x)
    absmax = blocks.amax(dim=1)
    unit = blocks / absmax.clamp(min=1e-38)[:, None]  # [0, 1]
    codes = torch.round(unit.sqrt().sqrt() * 255).to(torch.uint8)
    return codes.reshape(-1), absmax


def dequantize_unsigned(codes: torch.Tensor, absmax: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    unit = codes.view(-1, BLOCK).float() / 255
    return ((unit * unit) ** 2 * absmax[:, None]).reshape(-1)[: like.numel()].view(like.shape)


class AdamW8bit(torch.optim.Optimizer):
    """torch.optim.AdamW's update with 8-bit blockwise moment states (see the module docstring)."""

    def __init__(
        self,
        params: Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    def _moments(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        state = self.state[p]
        if not state:
            state["step"] = 0
            if p.numel() >= MIN_8BIT_SIZE:
                zeros = torch.zeros_like(p, dtype=torch.float32)
                state["m_codes"], state["m_absmax"] = quantize_signed(zeros)
                state["v_codes"], state["v_absmax"] = quantize_unsigned(zeros)
            else:
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
        if "exp_avg" in state:
            return state["exp_avg"], state["exp_avg_sq"]
        m = dequantize_signed(state["m_codes"], state["m_absmax"], p)
        return m, dequantize_unsigned(state["v_codes"], state["v_absmax"], p)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                m, v = self._moments(p)
                g = p.grad.float()
                m.lerp_(g, 1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["step"] += 1
                t = state["step"]
                step_size = group["lr"] / (1 - beta1**t)
                denom = (v.sqrt() / math.sqrt(1 - beta2**t)).add_(group["eps"])
                p32 = p.float()
                p32.mul_(1 - group["lr"] * group["weight_decay"]).addcdiv_(m, denom, value=-step_size)
                p.copy_(p32)
                if "m_codes" in state:
                    state["m_codes"], state["m_absmax"] = quantize_signed(m)
                    state["v_codes"], state["v_absmax"] = quantize_unsigned(v)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As Optimizer.load_state_dict, but codes and scales keep their dtypes (the base class casts every state
        tensor to its parameter's dtype)."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            p = params[int(index)]
            for key, value in saved.items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(p.device)
