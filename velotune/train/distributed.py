"""Training on N processes (torchrun): process group, this rank's share of each step, DDP or FSDP2 wrapping, the
global token normaliser, and checkpoints that move between 1 and N processes. The only module that reads env.

The training loop stays one loop. Every step, all ranks take the same global batch from the seeded order; each
keeps its strided share (rank, rank + world, ...: DistributedSampler's split, without its padding, which would
repeat examples and change the loss), cut into micro-batches. The step's target-token count is all-reduced before
any backward, so each rank's loss is sum(its token losses) / (target tokens on ALL ranks), exactly the 1-process
definition. DDP and FSDP2 both AVERAGE gradients over ranks, so the loss that is back-propagated is multiplied by
the world size (`Parallel.loss_scale`): the reduced gradient is then the sum over ranks, i.e. the gradient of the
1-process loss. Ranks whose share is short of micro-batches run a zero-weight one, so every rank makes the same
collective calls.

Checkpoints stay in the 1-process format: trainable weights by parameter name and `optimizer.state_dict()` keyed
by parameter index, both full (DTensor shards gathered). LoRA weights and their AdamW state are small, so
gathering them beats a sharded torch.distributed.checkpoint layout, and a checkpoint written by N processes
resumes on M, 1 included. Rank 0 writes (`rank0_only`); every rank reads the file and keeps its shard.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from velotune.errors import ConfigError
from velotune.models.frozen import FrozenQuantLinear

STRATEGIES = ("auto", "ddp", "fsdp")  # auto: choose_strategy decides from the memory plan
T = TypeVar("T")


# ---- the process group ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: rank of world_size (local_rank on its host) and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return "WORLD_SIZE" in env and "RANK" in env


def check_layout(world_size: int, strategy: str, device_type: str, gpus: int) -> None:
    """Refuse a process layout that cannot work, saying what to change."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy {strategy!r} is unknown; use one of: {', '.join(STRATEGIES)}")
    if strategy == "fsdp" and world_size < 2:
        raise ConfigError(
            "strategy fsdp shards the model over processes, but this run has 1 process; start it with "
            "`velotune train --nproc N` (N >= 2) or torchrun, or use strategy ddp (or no strategy) for one process"
        )
    if device_type == "cuda" and world_size > gpus:
        raise ConfigError(
            f"{world_size} processes asked for, but this host has {gpus} CUDA GPU(s); one process drives one GPU: "
            f"use --nproc {gpus} or fewer"
        )


def choose_strategy(planned_bytes: int | None, usable_bytes: int | None) -> tuple[str, str]:
    """(ddp or fsdp, why) for strategy auto: DDP (a whole model per GPU, fastest) when the planned peak of one
    process fits its GPU, else FSDP2 (weights sharded over the processes). Without a GPU budget: ddp."""
    if planned_bytes is None or usable_bytes is None:
        return "ddp", "no GPU memory limit to plan against"
    gib = 2**30
    if planned_bytes <= usable_bytes:
        fit = f"planned peak {planned_bytes / gib:.1f} of {usable_bytes / gib:.1f} GiB"
        return "ddp", f"a whole model per GPU fits: {fit}"
    return "fsdp", (
        f"a whole model per GPU does not fit (planned peak {planned_bytes / gib:.1f} GiB, {usable_bytes / gib:.1f} "
        "usable): FSDP2 shards it over the processes"
    )


def init_distributed(
    device: str | torch.device = "auto", strategy: str = "ddp", env: Mapping[str, str] | None = None
) -> DistEnv:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK, check the layout and join the process group (NCCL on CUDA,
    gloo on CPU). Without torchrun's variables: one process, no group."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1"))
    rank, local_rank = int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    gpus = torch.cuda.device_count() if dev.type == "cuda" else 0
    check_layout(local_world if dev.type == "cuda" else world, strategy, dev.type, gpus)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return DistEnv(rank, world, local_rank, dev)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def launch_command(nproc: int, argv: Sequence[str], env: Mapping[str, str] | None = None) -> list[str] | None:
    """The command that re-runs this CLI under torchrun with `nproc` processes on this host, or None when nothing
    needs launching (one process, or already inside torchrun)."""
    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    if nproc == 1 or launched_by_torchrun(env):
        return None
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    return [*run, "-m", "velotune.cli.main", *argv]


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rank0_only(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Call fn (a write, a print) on rank 0 only; every rank waits until it is done, so none reads a file before
    it exists. Returns fn's result on rank 0 and None elsewhere."""
    result = fn(*args, **kwargs) if _rank() == 0 else None
    if dist.is_initialized():
        dist.barrier()
    return result


def whole_model_on_rank0(model: nn.Module, rebuild: Callable[[], nn.Module]) -> nn.Module | None:
    """A CPU copy of an FSDP-sharded model with whole weights, on rank 0 (None elsewhere); a collective.

    `rebuild` makes the same module structure (on the meta device is fine); the gathered full state dict is
    assigned into it, so rank 0 can save adapters and merged models with the 1-process code.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if _rank() != 0:
        return None
    copy = rebuild()
    copy.load_state_dict(state, assign=True)
    if hasattr(copy, "tie_weights"):
        copy.tie_weights()
    return copy


# ---- one step -------------------------------------------------------------------------------------------------


def rank_share(examples: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's examples of a global batch: rank, rank + world, ... (deterministic, no repeats)."""
    return list(examples[rank::world_size])


def micro_batches(examples: Sequence[T], micro_batch_size: int, world_size: int, rank: int) -> list[list[T]]:
    """This rank's share of a step, as micro-batches; the same count on every rank (an empty one where the share
    runs short: run it with `weight` 0)."""
    per_rank = -(-len(examples) // world_size)  # the longest share
    count = max(1, -(-per_rank // micro_batch_size))
    mine = rank_share(examples, rank, world_size)
    return [mine[m * micro_batch_size : (m + 1) * micro_batch_size] for m in range(count)]


def all_reduce_sum(value: float | int, device: torch.device) -> float:
    """Sum of a number over all ranks (the number itself on one process)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


def all_reduce_sums(values: Sequence[float | int], device: torch.device) -> list[float | int]:
    """Sums of several numbers over all ranks in one collective (the numbers themselves on one process)."""
    if not dist.is_initialized() or not values:
        return list(values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


class Parallel:
    """The model as the loop drives it on 1 or N processes: `module` is what to call (the DDP wrapper, or the
    model itself), `model` the CausalLM, for weights and properties."""

    def __init__(
        self, model: nn.Module, env: DistEnv, strategy: str | None = None, offload_params: bool = False
    ) -> None:
        self.model, self.env = model, env
        self.strategy = ("ddp" if strategy == "auto" else strategy) if env.distributed else None
        self.module: nn.Module = model
        self.note = ""  # what the strategy did, for the run log
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [env.device.index] if env.device.type == "cuda" else None
            self.module = DistributedDataParallel(model, device_ids=ids)
        elif self.strategy == "fsdp":
            local, whole = shard_decoder(model, env, offload_params)
            self.note = (
                f"FSDP2 over {env.world_size} processes: each holds {local / 2**20:.1f} MiB of the "
                f"{whole / 2**20:.1f} MiB of weights ({local / whole:.0%})"
            )
            if offload_params:
                self.note += "; shards, gradients and optimizer state in host memory (fsdp_offload_params)"
            q_local, q_whole = held_bytes(model, quantized_only=True)
            if q_whole:
                q_share = f"{q_local / 2**20:.2f} of the {q_whole / 2**20:.2f} MiB"
                self.note += f", {q_share} of quantized ones ({q_local / q_whole:.0%})"
        elif self.strategy is not None:
            check_layout(env.world_size, self.strategy, env.device.type, torch.cuda.device_count())

    @property
    def loss_scale(self) -> int:
        """What the backward loss is multiplied by so that averaged gradients come out summed over ranks."""
        return self.env.world_size if self.strategy else 1

    def step_micro_batches(self, examples: Sequence[dict], micro_batch_size: int) -> list[list[dict]]:
        return micro_batches(examples, micro_batch_size, self.env.world_size, self.env.rank)

    @contextlib.contextmanager
    def sync(self, last: bool) -> Iterator[None]:
        """Reduce gradients only on the last micro-batch of a step (DDP no_sync; FSDP2 gradient sync off)."""
        if self.strategy == "ddp" and not last:
            with self.module.no_sync():
                yield
        elif self.strategy == "fsdp":
            self.model.set_requires_gradient_sync(last)
            yield
        else:
            yield


def shard_decoder(model: nn.Module, env: DistEnv, offload_params: bool = False) -> tuple[int, int]:
    """FSDP2 in place: one unit per decoder layer (its LoRA weights inside), the root holding embeddings, final
    norm and lm_head (read directly by the fused loss, so they must be gathered for the whole forward). 4-bit
    weights are frozen parameters, so they are sharded too. offload_params keeps the shards (and so gradients and
    optimizer state) in host memory, copied in per unit for compute: ZeRO-3 with offload. Returns (bytes of
    weights this process holds, whole)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    policy = CPUOffloadPolicy(pin_memory=env.device.type == "cuda") if offload_params else OffloadPolicy()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, offload_policy=policy)
    fully_shard(model, mesh=mesh, offload_policy=policy)
    return held_bytes(model)


def held_bytes(model: nn.Module, quantized_only: bool = False) -> tuple[int, int]:
    """(bytes of weights this process holds, bytes of the whole weights): FSDP2 shards count their local part.
    quantized_only: only the storage of quantized linears (FrozenQuantLinear)."""
    if quantized_only:
        tensors = [t for m in model.modules() if isinstance(m, FrozenQuantLinear) for t in m.parameters(recurse=False)]
    else:
        tensors = [*model.parameters(), *model.buffers()]
    local = whole = 0
    for tensor in tensors:
        size = tensor.element_size()
        whole += tensor.numel() * size
        local += (tensor.to_local() if hasattr(tensor, "to_local") else tensor).numel() * size
    return local, whole


def clip_grad_norm(params: Sequence[torch.Tensor], max_norm: float) -> float:
    """clip_grad_norm_ that also takes FSDP2's sharded (DTensor) gradients: the norm is over the full gradients."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    norm = torch.nn.utils.get_total_norm(grads)
    if hasattr(norm, "full_tensor"):  # DTensor: partial norms from each shard
        norm = norm.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return float(norm)


# ---- checkpoints that move between layouts ----------------------------------------------------------------------


def _full(t: Any) -> Any:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `param` is: this rank's shard for a DTensor parameter, else itself on param's device."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements)
    return full.to(param.device)


def full_trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable weights by name, whole and on the CPU (a collective under FSDP: call it on every rank)."""
    return {n: _full(p.detach()).contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def load_full_trainable_state(
    model: nn.Module, weights: Mapping[str, torch.Tensor], source: str = "checkpoint"
) -> None:
    """Copy whole trainable weights into the model (sharding them under FSDP); names and shapes must match exactly.

    `source` (the checkpoint's path) starts every error message.
    """
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
    if missing or unexpected:
        raise ConfigError(
            f"{source}: its trained parameters do not match this model's (missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}); resume with the model, finetuning and LoRA settings the checkpoint was made with"
        )
    for name, p in params.items():
        if tuple(weights[name].shape) != tuple(p.shape):
            raise ConfigError(f"{source}: {name} has shape {tuple(weights[name].shape)}, the model {tuple(p.shape)}")
        p.copy_(_like(weights[name], p))


def save_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, directory: Path) -> None:
    """Trainable weights and optimizer state through torch.distributed.checkpoint: each process writes its own
    shards (a collective under FSDP). Frozen weights are left out: they come from the base checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    options = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory))


def load_sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, directory: Path) -> None:
    """Load save_sharded_state's files into `model` (and `optimizer`), resharded for this run's layout: FSDP on
    any number of processes, DDP, or one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    options = StateDictOptions(ignore_frozen_params=True)
    if optimizer is None:
        state = {"model": get_model_state_dict(model, options=options)}
        dcp.load(state, checkpoint_id=str(directory))
        set_model_state_dict(model, state["model"], options=options)
        return
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """optimizer.state_dict() with whole tensors on the CPU: the 1-process format (a collective under FSDP)."""
    sd = optimizer.state_dict()
    state = {i: {k: _full(v).cpu() if torch.is_tensor(v) else v for k, v in s.items()} for i, s in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def load_full_optimizer_state(optimizer: torch.optim.Optimizer, sd: Mapping[str, Any]) -> None:
    """Load a 1-process-format optimizer state, sharding each parameter's state as the parameter is sharded."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    state = {}
    for i, s in sd["state"].items():
        p = params[int(i)]
        state[i] = {k: _like(v, p) if torch.is_tensor(v) and v.shape == p.shape else v for k, v in s.items()}
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
