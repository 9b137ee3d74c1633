"""Activation checkpointing of decoder layers, optionally with the saved layer inputs offloaded to host memory.

Each checkpointed layer keeps only its input and runs again in backward. The layer is called there with
need_output=False: its output is discarded, so the last projection (the MLP's down projection) skips its base
matmul in the recomputation, 27 % of a Llama layer's forward matmuls (the layer must accept that keyword).

Offload mode copies each layer's input to a pinned host buffer on a side CUDA stream, so the PCIe transfer
overlaps the compute stream's matmuls; backward prefetches the input of the layer below while the current one
runs. GPU memory for saved activations drops from layers x tokens x hidden to about two layers' worth.
The random state is saved and restored around the recomputation when the layer has active dropout.

Tiling (`run_tiled`, used by the MLP on long sequences) applies a token-wise function to the sequence a tile of
tokens at a time: forward keeps only the input, backward recomputes and differentiates one tile at a time, so the
function's [tile x intermediate] tensors exist for one tile only. Inside a checkpointed layer's recomputation
(need_output=False) its forward computes nothing: the backward recomputes anyway.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

_PINNED: dict[tuple[int, tuple[int, ...], torch.dtype], torch.Tensor] = {}
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
# A grad-requiring input gives the Function's output a grad_fn even when the layer input needs no gradient
# (frozen embeddings under LoRA); the trainable weights live inside `fn`, where autograd cannot see them.
_GRAD_ANCHOR = torch.empty(0, requires_grad=True)


def _host_buffer(slot: int, like: torch.Tensor) -> torch.Tensor:
    key = (slot, tuple(like.shape), like.dtype)
    buf = _PINNED.get(key)
    if buf is None:
        buf = torch.empty(like.shape, dtype=like.dtype, pin_memory=True)
        _PINNED[key] = buf
    return buf


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    stream = _SIDE_STREAMS.get(device)
    if stream is None:
        stream = _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return stream


class _HostCopy:
    """A layer input kept in pinned host memory, and its way back to the GPU (possibly in flight)."""

    __slots__ = ("host", "device", "below", "on_device", "ready")

    def __init__(self, x: torch.Tensor, slot: int, below: _HostCopy | None) -> None:
        self.host, self.device, self.below = _host_buffer(slot, x), x.device, below
        self.on_device: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None
        side = _side_stream(x.device)
        side.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(side):
            self.host.copy_(x.detach(), non_blocking=True)
        x.record_stream(side)  # the allocator must not hand x's memory out before the copy has read it

    def prefetch(self) -> None:
        if self.on_device is not None:
            return
        compute, side = torch.cuda.current_stream(self.device), _side_stream(self.device)
        self.on_device = torch.empty(self.host.shape, dtype=self.host.dtype, device=self.device)
        side.wait_stream(compute)  # the destination's memory may have been in use on the compute stream
        with torch.cuda.stream(side):
            self.on_device.copy_(self.host, non_blocking=True)
            self.ready = side.record_event()

    def fetch(self) -> torch.Tensor:
        self.prefetch()
        torch.cuda.current_stream(self.device).wait_event(self.ready)
        x, self.on_device, self.ready = self.on_device, None, None
        return x


_LAST_COPY: dict[torch.device, _HostCopy | None] = {}


def _has_dropout(layer: Any) -> bool:
    return isinstance(layer, nn.Module) and any(
        isinstance(m, nn.Dropout) and m.p > 0 and m.training for m in layer.modules()
    )


@contextlib.contextmanager
def _rng_restored(state: tuple | None, device: torch.device) -> Any:
    if state is None:
        yield
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


class _RecomputedLayer(torch.autograd.Function):
    """Run `fn(x, *rest)` without saving activations; keep x (on the device, or on the host); recompute in
    backward with need_output=False."""

    @staticmethod
    def forward(
        ctx: Any,
        fn: Callable,
        slot: int,
        first: bool,
        offload: bool,
        anchor: torch.Tensor,
        x: torch.Tensor,
        *rest: Any,
    ) -> torch.Tensor:
        ctx.fn, ctx.rest, ctx.copy = fn, rest, None
        if offload and x.is_cuda:
            below = None if first else _LAST_COPY.get(x.device)  # the copy of the layer below, in this forward
            ctx.copy = _LAST_COPY[x.device] = _HostCopy(x, slot, below)
        else:
            ctx.save_for_backward(x)
        ctx.rng = None
        if _has_dropout(fn):
            ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None)
        ctx.device = x.device
        with torch.no_grad():
            return fn(x, *rest)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        if ctx.copy is not None:
            x = ctx.copy.fetch()
            if ctx.copy.below is not None:
                ctx.copy.below.prefetch()  # overlaps this layer's backward
            ctx.copy = None
        else:
            (x,) = ctx.saved_tensors
        need_x = ctx.needs_input_grad[5]  # x follows fn, slot, first, offload, anchor
        x = x.detach().requires_grad_(need_x)
        with torch.enable_grad(), _rng_restored(ctx.rng, ctx.device):
            out = ctx.fn(x, *ctx.rest, need_output=False)
        torch.autograd.backward(out, grad_out)
        return (None,) * 5 + (x.grad if need_x else None,) + (None,) * len(ctx.rest)


def run_layer(
    layer: Callable, x: torch.Tensor, *rest: Any, mode: str | None, slot: int, first: bool = False
) -> torch.Tensor:
    """Run one decoder layer under checkpointing `mode`: None, "checkpoint" or "offload". `slot` numbers the layer
    (its host buffer); `first` marks the first checkpointed layer of a forward pass.

    Under checkpointing, `layer` must accept need_output=False (called so in the recomputation)."""
    if mode is None:
        return layer(x, *rest)
    return _RecomputedLayer.apply(layer, slot, first, mode == "offload", _GRAD_ANCHOR, x, *rest)


def checkpointed_layers(num_layers: int, fraction: float) -> list[bool]:
    """Which of `num_layers` layers recompute when a `fraction` of them do, spread evenly (the rest keep their
    activations: faster backward, more memory)."""
    k = round(min(max(fraction, 0.0), 1.0) * num_layers)
    return [(i + 1) * k // num_layers > i * k // num_layers for i in range(num_layers)]


class _Tiled(torch.autograd.Function):
    """fn over x [..., H] in tiles of `tile` tokens; saves x alone; backward recomputes tile by tile, the weights'
    gradients accumulating through fn's own graph (as in _RecomputedLayer)."""

    @staticmethod
    def forward(
        ctx: Any, fn: Callable, tile: int, need_output: bool, anchor: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        ctx.fn, ctx.tile = fn, tile
        ctx.save_for_backward(x)
        ctx.rng = None
        if _has_dropout(fn):
            ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.is_cuda else None)
        ctx.device = x.device
        if not need_output:
            return torch.empty_like(x)
        x2 = x.reshape(-1, x.shape[-1])  # [N, H]
        with torch.no_grad():
            out = torch.cat([fn(x2[s : s + tile]) for s in range(0, x2.shape[0], tile)])  # [N, H']
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple:
        (x,) = ctx.saved_tensors
        need_x = ctx.needs_input_grad[4]
        x2, dy2 = x.detach().reshape(-1, x.shape[-1]), grad_out.reshape(-1, grad_out.shape[-1])  # [N, H], [N, H']
        dx = torch.empty_like(x2) if need_x else None
        with torch.enable_grad(), _rng_restored(ctx.rng, ctx.device):
            for s in range(0, x2.shape[0], ctx.tile):
                xt = x2[s : s + ctx.tile].requires_grad_(need_x)  # a view: its own leaf
                out = ctx.fn(xt, need_output=False)  # only the graph is needed
                if out.requires_grad:
                    torch.autograd.backward(out, dy2[s : s + ctx.tile])
                if need_x:
                    dx[s : s + ctx.tile] = xt.grad
        return None, None, None, None, dx.view(x.shape) if need_x else None


def run_tiled(fn: Callable, x: torch.Tensor, tile: int | None, need_output: bool = True) -> torch.Tensor:
    """fn(x) for a token-wise fn (each token's output depends on that token alone) over x [..., H], a tile of `tile`
    tokens at a time in forward and backward; fn must accept need_output=False. tile None, or no more tokens than
    one tile, is the plain call."""
    if tile is None or x.numel() // x.shape[-1] <= tile:
        return fn(x, need_output=need_output)
    return _Tiled.apply(fn, tile, need_output, _GRAD_ANCHOR, x)
