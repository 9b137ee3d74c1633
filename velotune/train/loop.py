"""The training loop: micro-batches, gradient accumulation under the objective's global normaliser, clipping,
schedule, logs, and what lets a run be left alone overnight: checkpoints and exact resume, SIGINT/SIGTERM handling,
skipping non-finite steps, out-of-memory recovery, periodic evaluation with early stopping, and the training
monitor.

What is trained is an objective (train/objectives: SFT, DPO, ORPO, SimPO): it turns examples into a batch and a
batch into a loss. For SFT the loss of an optimizer step is sum(token losses over all its micro-batches) / (target
tokens in all of them, on all ranks), so accumulation 4 x batch 1 gives the same update as batch 4 x accumulation 1
whatever the sequence lengths; this is also why out-of-memory recovery can halve the micro-batch and double
accumulation without changing the step. Preference objectives normalise by pairs the same way.

Step `s` (1-based) trains on a fixed slice of epoch (s - 1) // steps_per_epoch's seeded permutation, so the data
order is a function of the step alone and a resumed run sees the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from velotune.data import collate
from velotune.errors import ConfigError, TrainingError
from velotune.models.decoder import CausalLM, count_targets
from velotune.train.callbacks import TrainerCallback
from velotune.train.checkpoint import (
    METRICS,
    PREFIX,
    SHARDED,
    Checkpoint,
    TrainState,
    load_checkpoint,
    remove_partial,
    restore_rng,
    rotate,
    save_checkpoint,
    staging_dir,
)
from velotune.train.config import TrainConfig
from velotune.train.distributed import (
    DistEnv,
    Parallel,
    all_reduce_sums,
    clip_grad_norm,
    full_optimizer_state,
    full_trainable_state,
    load_full_optimizer_state,
    load_full_trainable_state,
    load_sharded_state,
    rank0_only,
    save_sharded_state,
)
from velotune.train.monitor import Notice, TrainingMonitor
from velotune.train.objectives import SFT, Objective
from velotune.train.oom import free_memory, is_out_of_memory, largest_fitting, optimizer_state_bytes
from velotune.train.optim import build_optimizer, build_scheduler, warmup_steps
from velotune.train.report import MetricsLog, read_metrics


class TrainingInterrupted(Exception):  # noqa: N818  (a stop the user asked for, not an error)
    """SIGINT/SIGTERM stopped training at a step boundary, after a checkpoint was written."""

    def __init__(self, signum: int, step: int, checkpoint: Path | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        where = f"; checkpoint {checkpoint}" if checkpoint else ""
        super().__init__(f"{name} received: stopped after step {step}{where}")


@dataclass
class TrainResult:
    steps: int = 0
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    start_step: int = 0  # steps done before this process began (resumed runs)
    skipped: list[dict] = field(default_factory=list)
    oom_events: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    last_checkpoint: Path | None = None
    best_checkpoint: str | None = None
    micro_batch_size: int = 0
    accumulation: int = 0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def load_trained(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, ckpt: Checkpoint) -> None:
    """A checkpoint's trained weights, and with `optimizer` its optimizer state, into the model: whole states
    (sharded by FSDP as they load) or torch.distributed.checkpoint shards (every process: a collective)."""
    if ckpt.weights is None:
        load_sharded_state(model, optimizer, ckpt.path / SHARDED)
        return
    load_full_trainable_state(model, ckpt.weights, str(ckpt.path))
    if optimizer is not None:
        load_full_optimizer_state(optimizer, ckpt.optimizer)


class Trainer:
    """Trains `model` (its parameters with requires_grad) on tokenized examples."""

    def __init__(
        self,
        model: CausalLM,
        examples: Sequence[dict],
        cfg: TrainConfig,
        pad_id: int,
        run_dir: Path | None = None,
        packing: bool = False,
        max_seq_length: int | None = None,
        progress: bool = True,
        *,
        eval_examples: Sequence[dict] | None = None,
        config: dict[str, Any] | None = None,
        objective: Objective | None = None,
        callbacks: Sequence[TrainerCallback] = (),
        integrations: list[Any] | None = None,
        log: Callable[[str], Any] = print,
        parallel: Parallel | None = None,
    ) -> None:
        self.model, self.examples, self.cfg = model, examples, cfg
        self.objective = objective or SFT()
        self.objective.setup(model)
        # 1 or N processes (distributed.py): the module to call, this rank, the world size
        self.par = parallel or Parallel(model, DistEnv(device=model.device))
        self.world_size = self.par.env.world_size
        # FSDP training whole layers: checkpoints in shards (torch.distributed.checkpoint), never gathered whole
        self.sharded_checkpoints = self.par.strategy == "fsdp" and cfg.finetuning != "lora"
        self.pad_id, self.packing, self.max_seq_length = pad_id, packing, max_seq_length
        self.run_dir, self.progress, self.log = run_dir, progress, log
        self.eval_examples, self.config, self.callbacks = eval_examples, config or {}, list(callbacks)
        self.step_metrics: dict[str, float] = {}  # the objective's metrics of the last step, averaged
        self.integrations = integrations or []  # report.py sinks (TensorBoard, W&B) beside metrics.jsonl
        # the GLOBAL batch: every rank takes the same step examples and keeps its share (distributed.micro_batches)
        # rows: what micro-batches hold; an objective may make several rows of one example (GRPO: a group of
        # completions per prompt) and train on one step's rows for several steps (num_iterations)
        self.rows_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * self.world_size
        group = self.objective.rows_per_example
        if self.rows_per_step % group:
            raise ConfigError(
                f"per_device_train_batch_size x gradient_accumulation_steps x processes = {self.rows_per_step} rows "
                f"per step is not a whole number of groups of {group} (num_generations); make it a multiple of {group}"
            )
        self.per_step = self.rows_per_step // group  # dataset examples per step
        self.data_steps_per_epoch = max(1, math.ceil(len(examples) / self.per_step))
        self.steps_per_epoch = self.data_steps_per_epoch * self.objective.iterations
        self.total_steps = (
            cfg.max_steps if cfg.max_steps > 0 else math.ceil(self.steps_per_epoch * cfg.num_train_epochs)
        )
        self.params = [p for p in model.parameters() if p.requires_grad]  # after wrapping: FSDP2's DTensors
        self.optimizer = build_optimizer(self.params, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total_steps)
        self.state = TrainState(
            micro_batch_size=cfg.per_device_train_batch_size,
            accumulation=cfg.gradient_accumulation_steps,
            data=self._data_identity(),
        )
        warm = warmup_steps(cfg, self.total_steps)
        self.monitor = TrainingMonitor(
            cfg.learning_rate, cfg.gradient_accumulation_steps, warm, cfg.max_grad_norm, cfg.early_stopping_patience
        )
        self._orders: dict[int, list[int]] = {}
        self._stop_signal: int | None = None
        self._metrics: MetricsLog | None = None
        self._bar: Any = None

    # ---- data order -------------------------------------------------------------------------------------------

    def _data_identity(self) -> dict:
        rows = [self.examples[i].get("row") for i in range(min(4, len(self.examples)))]
        return {"examples": len(self.examples), "per_step": self.per_step, "seed": self.cfg.seed, "first_rows": rows}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(self.cfg.seed + epoch)
            self._orders = {epoch: torch.randperm(len(self.examples), generator=gen).tolist()}
        return self._orders[epoch]

    def step_examples(self, step: int) -> list[dict]:
        """The examples of optimizer step `step` (1-based); with num_iterations > 1, consecutive steps share them."""
        epoch, s = divmod((step - 1) // self.objective.iterations, self.data_steps_per_epoch)
        idx = self._order(epoch)[s * self.per_step : (s + 1) * self.per_step]
        return [self.examples[i] for i in idx]

    def split(self, examples: list[dict]) -> list[list[dict]]:
        """A step's examples as micro-batches of the micro-batch size in force."""
        bs = self.state.micro_batch_size
        return [examples[m : m + bs] for m in range(0, len(examples), bs)]

    def step_batches(self) -> Iterator[list[list[dict]]]:
        """For each optimizer step, its micro-batches (lists of examples), epoch after epoch."""
        step = 1
        while True:
            yield self.split(self.step_examples(step))
            step += 1

    # ---- one step ---------------------------------------------------------------------------------------------

    def _batch(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        obj = self.objective
        batch = obj.collate(examples, self.pad_id, packing=self.packing, max_seq_length=self.max_seq_length)
        return {k: v.to(self.model.device) for k, v in batch.items() if k in obj.inputs}

    def accumulate(
        self, micro_batches: list[list[dict]], step: int = 0, micro_batch_size: int | None = None
    ) -> tuple[float, int]:
        """Forward + backward of one optimizer step's micro-batches; returns (loss, tokens), both over all ranks,
        and leaves the objective's metrics, averaged over the step, in `step_metrics`.

        Each micro-batch's loss is divided by the objective's counts (SFT: target tokens) of ALL micro-batches of
        the step, on all ranks. On N processes `micro_batches` is the step's GLOBAL batch: this rank keeps its
        share, cut into micro-batches of `micro_batch_size` (the one in force by default), and a rank whose share
        runs short runs a zero-weight micro-batch so every rank makes the same collective calls.
        """
        par, dev = self.par, self.par.env.device
        filler = None
        if par.env.distributed:
            examples = [e for mb in micro_batches for e in mb]
            micro_batches = par.step_micro_batches(examples, micro_batch_size or self.state.micro_batch_size)
            filler = self._batch(examples[:1]) if not all(micro_batches) else None
        obj = self.objective
        batches = [self._batch(mb) if mb else None for mb in micro_batches]
        mine: dict[str, int] = {}
        for b in batches:
            for k, v in (obj.counts(b) if b is not None else {}).items():
                mine[k] = mine.get(k, 0) + v
        keys = sorted(mine or obj.counts(filler))
        reduced = all_reduce_sums([mine.get(k, 0) for k in keys], dev)
        totals = {k: max(int(v), 1) for k, v in zip(keys, reduced, strict=True)}
        loss_total, tokens, metric_sums = 0.0, 0, {}
        for i, b in enumerate(batches):
            empty = b is None
            b = filler if empty else b
            with par.sync(last=i == len(batches) - 1):
                loss, metrics = obj.loss(par.module, b, totals)
                for cb in self.callbacks:
                    loss = cb.on_micro_batch_loss(step, loss)
                loss = loss * 0.0 if empty else loss
                (loss * par.loss_scale if par.loss_scale != 1 else loss).backward()
            loss_total += float(loss.detach())
            tokens += 0 if empty else obj.tokens(b)
            for k, v in ({} if empty else metrics).items():
                metric_sums[k] = metric_sums.get(k, 0.0) + v
            for cb in self.callbacks:
                cb.on_micro_batch_end(step, i)
        names = sorted(metric_sums)
        if par.env.distributed:
            reduced = all_reduce_sums([loss_total, tokens, *(metric_sums[k] for k in names)], dev)
            loss_total, tokens = reduced[0], int(reduced[1])
            metric_sums = dict(zip(names, reduced[2:], strict=True))
        unit = totals.get(obj.metric_unit, 1)
        self.step_metrics = {k: metric_sums[k] / unit for k in names}
        return loss_total, tokens

    def train_step(self, micro_batches: list[list[dict]], step: int = 0) -> tuple[float, float, int]:
        """One optimizer step; returns (loss, grad norm, tokens). A step whose loss or gradient norm is not finite
        leaves weights and optimizer untouched (the schedule still advances, keeping it tied to the step count)."""
        loss, tokens = self.accumulate(micro_batches, step)
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        grad_norm = clip_grad_norm(self.params, max_norm)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.scheduler.step()
        else:
            with warnings.catch_warnings():  # torch warns when the first step of a run is a skipped one
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
                self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, tokens

    def _run_step(self, step: int) -> tuple[list[dict], float, float, int]:
        """train_step on step `step`'s rows, halving the micro-batch after each out-of-memory error."""
        examples = self.objective.prepare_step(self.step_examples(step), step)
        while True:
            try:
                return (examples, *self.train_step(self.split(examples), step))
            except RuntimeError as exc:
                if not is_out_of_memory(exc):
                    raise
            self._recover_from_oom(step, examples)  # outside `except`: the traceback and its tensors are gone

    def _recover_from_oom(self, step: int, examples: list[dict]) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        free_memory()
        bs = self.state.micro_batch_size
        if bs == 1:
            longest = max(self.objective.length(e) for e in examples)
            raise TrainingError(
                f"out of GPU memory at step {step} with micro-batch 1 (longest row {longest} tokens): set "
                "gradient_checkpointing: offload, load_in_4bit: true, or a lower max_seq_length; "
                "`velotune plan CONFIG` shows what fits"
            )
        new_bs = bs // 2
        acc = math.ceil(self.rows_per_step / (new_bs * self.world_size))
        old_acc = self.state.accumulation
        self.state.micro_batch_size, self.state.accumulation = new_bs, acc
        event = {"step": step, "event": "out_of_memory", "per_device_train_batch_size": new_bs}
        event["gradient_accumulation_steps"] = acc
        self.state.oom_events.append(event)
        self._record(event)
        self._say(
            f"out of GPU memory at step {step}: micro-batch {bs} -> {new_bs}, gradient accumulation {old_acc} -> "
            f"{acc} (same {self.rows_per_step} rows per step); retrying the step. Next time set "
            f"per_device_train_batch_size: {new_bs} and gradient_accumulation_steps: {acc}"
        )

    # ---- the loop ---------------------------------------------------------------------------------------------

    def train(self, resume_from: Path | None = None) -> TrainResult:
        self.model.train()
        if self.run_dir:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            rank0_only(remove_partial, self.run_dir)
        if resume_from is not None:
            self.restore(resume_from)
        result = TrainResult(start_step=self.state.step)
        result.losses = [r["loss"] for r in self._restored_rows() if "loss" in r and "skipped" not in r]
        main = self.par.env.is_main  # rank 0 alone writes metrics and shows progress
        path = self.run_dir / METRICS if self.run_dir and main else None
        self._metrics = MetricsLog(path, self.integrations if main else [])
        self._bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            desc="training",
            unit="step",
            disable=not (self.progress and main),
        )
        start = time.perf_counter() - self.state.elapsed_s
        try:
            with self._signal_guard():
                for step in range(self.state.step + 1, self.total_steps + 1):
                    if self._one_step(step, result, start):
                        break
        finally:
            self.state.elapsed_s = time.perf_counter() - start
            self._bar.close()
            self._metrics.close()
        result.seconds = time.perf_counter() - start
        result.steps, result.tokens = self.state.step, self.state.tokens
        result.skipped, result.oom_events = self.state.skipped, self.state.oom_events
        result.stopped_early, result.best_checkpoint = self.state.stopped_early, self.state.best_checkpoint
        result.micro_batch_size, result.accumulation = self.state.micro_batch_size, self.state.accumulation
        return result

    def _restored_rows(self) -> list[dict]:
        return read_metrics(self.run_dir / METRICS) if self.run_dir and self.state.step else []

    def _one_step(self, step: int, result: TrainResult, start: float) -> bool:
        """Train step `step`, then log, evaluate and checkpoint as due; True when training should stop."""
        lr = self.optimizer.param_groups[0]["lr"]
        self.state.eval_loss = None
        examples, loss, grad_norm, tokens = self._run_step(step)
        self.state.step = step
        self.state.epoch, self.state.step_in_epoch = divmod(step, self.steps_per_epoch)
        self.state.tokens += tokens
        self.state.elapsed_s = time.perf_counter() - start
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.state.bad_in_a_row = 0
            result.losses.append(loss)
            info = self.objective.step_info()
            samples = info.pop("samples", None)
            if step % self.cfg.logging_steps == 0 or step == self.total_steps:
                row = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens": self.state.tokens}
                row |= self.step_metrics | info | {"elapsed_s": round(self.state.elapsed_s, 3)}
                self._record(row | self._gpu_memory())
            if samples:
                self._record({"step": step, "samples": samples})
                self._say(f"step {step} samples:\n" + "\n".join(_sample_line(s) for s in samples))
            self._notify(self.monitor.observe(step, loss, grad_norm))
        else:
            self._skip(step, loss, grad_norm, lr, examples)
        for cb in self.callbacks:
            cb.on_step_logged(step)
        self._bar.update(1)
        self._bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        stop = self._evaluate(step) if self._due(self.cfg.eval_steps, step) and self.eval_examples else False
        self.state.stopped_early = stop
        saved = None
        if self._due(self.cfg.save_steps, step) or (self.cfg.save_steps and (stop or step == self.total_steps)):
            saved = result.last_checkpoint = self.save()
        for cb in self.callbacks:
            cb.on_step_end(step, self.par.env.rank)
        if self._stop_signal is not None:
            raise TrainingInterrupted(self._stop_signal, step, saved or self.save())
        return stop

    def _gpu_memory(self) -> dict[str, float]:
        """On CUDA, the peak memory allocated so far (GiB, this process) for the step's metrics row."""
        if self.par.env.device.type != "cuda":
            return {}
        return {"gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3)}  # this process's GPU

    @staticmethod
    def _due(every: int, step: int) -> bool:
        return every > 0 and step % every == 0

    def _skip(self, step: int, loss: float, grad_norm: float, lr: float, examples: list[dict]) -> None:
        """Count and report a non-finite step; after max_bad_steps in a row, stop with a diagnosis."""
        reason = "non-finite loss" if not math.isfinite(loss) else "non-finite gradient norm"
        rows = [str(e.get("row", "?")) for e in examples]
        self.state.bad_in_a_row += 1
        entry = {"step": step, "skipped": reason, "rows": rows}
        self.state.skipped.append(entry)
        self._record(entry | {"bad_in_a_row": self.state.bad_in_a_row})
        shown = ", ".join(rows[:8]) + (" ..." if len(rows) > 8 else "")
        self._say(f"step {step} skipped: {reason} (weights and optimizer untouched); its rows: {shown}")
        if self.state.bad_in_a_row >= self.cfg.max_bad_steps:
            saved = self.save() if self.run_dir else None
            raise TrainingError(self._diagnosis(step, lr, saved))

    def _diagnosis(self, step: int, lr: float, saved: Path | None) -> str:
        n = self.state.bad_in_a_row
        recent = [r for e in self.state.skipped[-n:] for r in e["rows"]]
        causes = [f"learning_rate {self.cfg.learning_rate:.1e} (now {lr:.1e}) too high: try {lr / 10:.1e}"]
        if self.model.dtype == torch.float16:
            causes.append("float16 overflow (dtype float16): use dtype: bfloat16, or float32 on older GPUs")
        causes.append(f"bad rows in these batches: {', '.join(recent[:12])} (look at them: velotune data inspect)")
        resume = f" {saved} holds the weights from before these steps; resume from it with a lower learning_rate."
        resume = resume if saved else ""
        return (
            f"training stopped at step {step}: {n} steps in a row had a non-finite loss or gradient norm "
            f"(max_bad_steps {self.cfg.max_bad_steps}; {len(self.state.skipped)} skipped in all). Likely causes: "
            + "; ".join(causes)
            + "."
            + resume
        )

    def _evaluate(self, step: int) -> bool:
        """The objective's eval metrics (SFT: loss and perplexity) into metrics; True when early stopping ends the
        run."""
        assert self.eval_examples is not None
        metrics = self.objective.evaluate(self.eval_examples, self.pad_id, self.cfg.per_device_eval_batch_size)
        loss = metrics["eval_loss"]
        self.state.eval_loss = loss
        ppl = {"eval_ppl": math.exp(min(loss, 50.0))} if isinstance(self.objective, SFT) else {}
        self._record({"step": step} | metrics | ppl)
        notices, stop = self.monitor.observe_eval(step, loss)
        self._notify(notices)
        return stop

    # ---- checkpoints ------------------------------------------------------------------------------------------

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (and rotate old ones); None without a run directory."""
        if self.run_dir is None:
            return None
        s = self.state
        s.monitor = self.monitor.state_dict()
        s.objective = self.objective.state_dict()
        if s.eval_loss is not None and (s.best_eval_loss is None or s.eval_loss < s.best_eval_loss):
            s.best_eval_loss, s.best_checkpoint = s.eval_loss, f"checkpoint-{s.step}"
        hooks = [cb.on_checkpoint_written for cb in self.callbacks]
        pause = (lambda step: [hook(step) for hook in hooks]) if hooks else None
        if self.sharded_checkpoints:  # every process writes its shards, rank 0 the rest and the rename
            staged = staging_dir(self.run_dir, s.step)
            rank0_only(lambda: (shutil.rmtree(staged, ignore_errors=True), staged.mkdir(parents=True)))
            save_sharded_state(self.model, self.optimizer, staged / SHARDED)
            args = (self.run_dir, None, None, self.scheduler, s, self.config, pause, staged)
        else:  # whole weights and optimizer state (collectives under FSDP: every rank), written by rank 0
            weights, optimizer = full_trainable_state(self.model), full_optimizer_state(self.optimizer)
            args = (self.run_dir, weights, optimizer, self.scheduler, s, self.config, pause)
        path = rank0_only(save_checkpoint, *args)
        rank0_only(rotate, self.run_dir, self.cfg.save_total_limit, s.best_checkpoint)
        return path or self.run_dir / f"{PREFIX}{s.step}"

    def restore(self, path: Path) -> None:
        """Put a checkpoint's weights, optimizer, schedule, RNG states, counters and metrics back."""
        ckpt = load_checkpoint(path)
        saved = ckpt.state
        mine = self._data_identity()
        if saved.data and saved.data != mine:
            raise ConfigError(
                f"{path}: the data order differs from the checkpoint's (it has {saved.data}, this run {mine}); "
                "resume with the same dataset, batch size, gradient accumulation and seed"
            )
        load_trained(self.model, self.optimizer, ckpt)
        self.scheduler.load_state_dict(ckpt.torch_state["scheduler"])
        self._apply_learning_rate()
        self.monitor.load_state_dict(saved.monitor)
        self.objective.load_state_dict(saved.objective)
        self.state = saved
        if self.run_dir and (ckpt.path / METRICS).exists():
            rank0_only(shutil.copyfile, ckpt.path / METRICS, self.run_dir / METRICS)
        restore_rng(saved.rng, ckpt.torch_state)  # last: nothing may draw random numbers after this

    def _apply_learning_rate(self) -> None:
        """After loading a schedule: use this config's learning_rate (resuming with a lower one after a divergence)."""
        lr = self.cfg.learning_rate
        if all(base == lr for base in self.scheduler.base_lrs):
            return
        self.scheduler.base_lrs = [lr for _ in self.scheduler.base_lrs]
        factor = self.scheduler.lr_lambdas[0](self.scheduler.last_epoch)
        for group in self.optimizer.param_groups:
            group["initial_lr"], group["lr"] = lr, lr * factor

    # ---- micro-batch search -----------------------------------------------------------------------------------

    def auto_micro_batch(self) -> str:
        """CUDA: the largest micro-batch (per_step, per_step / 2, ..., 1) whose step fits, with accumulation making
        up the rest of the batch; returns what was chosen (or why nothing was done)."""
        if self.model.device.type != "cuda":
            return (
                f"auto_batch_size: nothing to do on {self.model.device.type} (it searches GPU memory); "
                f"micro-batch stays {self.state.micro_batch_size}"
            )
        longest = max(range(len(self.examples)), key=lambda i: self.objective.length(self.examples[i]))
        probe = self.examples[longest]
        reserve = optimizer_state_bytes(self.params, self.cfg.optim)
        per_rank = self.rows_per_step // self.world_size
        found = largest_fitting(per_rank, lambda bs: self._fits(probe, bs, reserve))
        if found is None:
            raise TrainingError(
                f"auto_batch_size: even one row of {self.objective.length(probe)} tokens does not fit in GPU memory; "
                "set gradient_checkpointing: offload, load_in_4bit: true, or a lower max_seq_length"
            )
        self.state.micro_batch_size, self.state.accumulation = found, math.ceil(per_rank / found)
        return (
            f"auto_batch_size: micro-batch {found} x gradient accumulation {self.state.accumulation} "
            f"({per_rank} examples per step{' and process' if self.world_size > 1 else ''}, rows up to "
            f"{self.objective.length(probe)} tokens)"
        )

    def _fits(self, example: dict, bs: int, reserve: int) -> bool:
        held = torch.empty(reserve, dtype=torch.uint8, device=self.model.device)  # the optimizer states to come
        try:
            self.accumulate([[example] * bs * self.world_size], micro_batch_size=bs)
            ok = True
        except RuntimeError as exc:
            if not is_out_of_memory(exc):
                raise
            ok = False
        del held
        self.optimizer.zero_grad(set_to_none=True)
        free_memory()
        return ok

    # ---- reporting --------------------------------------------------------------------------------------------

    def _record(self, row: dict) -> None:
        if self._metrics is not None:
            self._metrics.write(row)

    def _say(self, text: str) -> None:
        """A message above the progress bar (or through `log` without one); rank 0 only."""
        if not self.par.env.is_main:
            return
        if self._bar is not None and not self._bar.disable:
            tqdm.write(text)
        else:
            self.log(text)

    def _notify(self, notices: list[Notice]) -> None:
        for n in notices:
            self._say(n.message)
            self._record(n.row())

    @contextlib.contextmanager
    def _signal_guard(self) -> Iterator[None]:
        """SIGINT/SIGTERM finish the current step, checkpoint and stop; a second one stops at once."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {s: signal.getsignal(s) for s in signals}

        def handler(signum: int, frame: Any) -> None:
            if self._stop_signal is not None:
                signal.signal(signum, previous[signum])
                raise KeyboardInterrupt
            self._stop_signal = signum
            self._say(
                f"{signal.Signals(signum).name} received: writing a checkpoint after this step, then stopping "
                "(send it again to stop at once)"
            )

        for s in signals:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s in signals:
                signal.signal(s, previous[s])


_MODEL_INPUTS = ("input_ids", "labels", "attention_mask", "position_ids")


@torch.no_grad()
def _sample_line(sample: dict) -> str:
    """One printed sample: its reward, then prompt and completion shortened to a line each."""

    def short(text: str, n: int) -> str:
        text = " ".join(str(text).split())
        return text if len(text) <= n else text[: n - 3] + "..."

    prompt, completion = short(sample["prompt"], 60), short(sample["completion"], 100)
    return f"  reward {sample.get('reward', float('nan')):+.3f}  {prompt!r} -> {completion!r}"


def evaluate_loss(model: CausalLM, examples: Sequence[dict], pad_id: int, batch_size: int = 8) -> float:
    """Mean token loss over `examples` (the loss definition the trainer uses)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        b = collate(list(examples[i : i + batch_size]), pad_id)
        b = {k: v.to(model.device) for k, v in b.items() if k in _MODEL_INPUTS}
        n = count_targets(b["labels"], b["position_ids"])
        if n:
            total += float(model(**b, num_items_in_batch=1).loss)
            count += n
    model.train(was_training)
    return total / max(count, 1)
