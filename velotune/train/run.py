"""A whole fine-tuning run: load, attach LoRA (or choose the layers that train), tokenize, score before, train
(resuming from a checkpoint when asked), score after, save, plot."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import yaml

from velotune.data import build_datasets
from velotune.errors import ConfigError, DataError
from velotune.lora.apply import get_peft_model, merge_lora
from velotune.lora.peft_format import load_adapter, save_adapter
from velotune.models.decoder import CausalLM, num_parameters
from velotune.quant.loading import load_quantized
from velotune.train.checkpoint import METRICS, config_differences, find_checkpoint, saved_config
from velotune.train.compare import Score, held_out_samples, score
from velotune.train.config import RunConfig
from velotune.train.distributed import (
    Parallel,
    choose_strategy,
    full_trainable_state,
    init_distributed,
    rank0_only,
    whole_model_on_rank0,
)
from velotune.train.explain import explain_untrainable
from velotune.train.faults import Faults
from velotune.train.loop import Trainer, TrainResult
from velotune.train.memory import (
    GiB,
    estimate,
    layers_trained,
    read_model_config,
    resolve_checkpoint_layers,
    setting_for,
    usable_bytes,
)
from velotune.train.objectives import build_objective
from velotune.train.report import MetricsLog, open_integrations, plot_metrics
from velotune.train.status import write_status

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DATA_REPORT = "data_report.txt"  # the training data's report (rows used and dropped, tokens), as the run printed it


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but CUDA is not available here; use device: cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


def run_dir_for(cfg: RunConfig) -> Path:
    if cfg.train.output_dir:
        return Path(cfg.train.output_dir)
    stem = Path(cfg.train.model_name_or_path or "smollm2").name.removesuffix(".gguf") or "model"
    return Path("runs") / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_paths(cfg: RunConfig, reward_funcs: list | None = None) -> None:
    """Fail on a missing, empty or malformed dataset file (its first rows, read as training reads them), or on data
    of the wrong kind for the method, before spending time loading the model."""
    from velotune.data import check_files
    from velotune.data.preference import check_preference_files

    if cfg.train.method == "sft":
        check_files(cfg.data)
    elif cfg.train.method == "grpo":
        from velotune.data.prompts import check_prompt_files
        from velotune.train.rewards import load_reward_funcs

        check_prompt_files(cfg.data)
        load_reward_funcs(reward_funcs or cfg.train.reward_funcs or [])  # a bad path fails before the model loads
    else:
        check_preference_files(cfg.data)
    if cfg.train.adapter:
        adapter_dir(cfg.train.adapter)


def adapter_dir(path: str) -> Path:
    """The PEFT adapter directory that `adapter` names: a run directory (its adapter/) or the adapter itself."""
    p = Path(path)
    for candidate in (p, p / "adapter"):
        if (candidate / "adapter_config.json").exists():
            return candidate
    raise ConfigError(
        f"adapter {path!r}: no adapter_config.json there or in {p / 'adapter'}; give a velotune run directory or a "
        "PEFT adapter directory"
    )


def freeze_for_partial(model: CausalLM, train_layers: float) -> int:
    """Train only the top decoder layers, the final norm and lm_head; returns how many layers train."""
    layers = model.model.layers
    n = layers_trained(train_layers, len(layers))
    model.requires_grad_(False)
    for module in (*layers[len(layers) - n :], model.model.norm, model.lm_head):
        module.requires_grad_(True)
    return n


def prepare_model(
    model: CausalLM, cfg: RunConfig, log: Callable[[str], Any], device: torch.device | None = None
) -> None:
    """LoRA, partial or full fine-tuning, and activation checkpointing, as the config says (`device`: the GPU that
    gradient_checkpointing_layers: auto plans for; default the model's)."""
    if cfg.train.finetuning == "lora" and cfg.train.adapter:
        load_adapter(model, adapter_dir(cfg.train.adapter))  # its r, alpha and targets; trained further
        log(f"adapter: continuing {adapter_dir(cfg.train.adapter)}")
    elif cfg.train.finetuning == "lora":
        get_peft_model(model, cfg.lora)
    elif cfg.train.finetuning == "partial":
        n = freeze_for_partial(model, cfg.train.train_layers)
        tied = " (lm_head is tied to the embeddings, which train with it)" if model.config.tie_word_embeddings else ""
        log(f"partial fine-tuning: the top {n} of {len(model.model.layers)} layers, final norm and lm_head{tied}")
    model.gradient_checkpointing = cfg.train.gradient_checkpointing
    device = device or next(model.parameters()).device
    model.checkpoint_layers, why = resolve_checkpoint_layers(cfg, model.config, device)
    if why:
        log(why)


def check_resume(checkpoint: Path, resolved: dict[str, Any], log: Callable[[str], Any]) -> None:
    """Refuse settings that would change the resumed run's batches or steps; note the harmless changes."""
    saved = saved_config(checkpoint)
    different = config_differences(saved, resolved, RunConfig().to_flat())
    if different:
        raise ConfigError(
            f"--resume {checkpoint}: the checkpoint was trained with other settings ({'; '.join(different)}); "
            "resume with the checkpoint's settings (drop these overrides), or start a new run in another output_dir"
        )
    changed = [k for k in resolved if k not in ("resume", "output_dir") and saved.get(k, resolved[k]) != resolved[k]]
    if changed:
        log(f"resuming with changed settings: {', '.join(f'{k}: {saved[k]!r} -> {resolved[k]!r}' for k in changed)}")


def load_data(cfg: RunConfig, tok: Any, reward_funcs: list | None = None) -> tuple[Any, Any]:
    """Train and eval datasets (SFT examples, or preference pairs for dpo / orpo / simpo); an SFT dataset with
    nothing to train on fails with the example that shows why."""
    if cfg.train.method == "grpo":
        from velotune.data.prompts import build_prompt_datasets, require_columns
        from velotune.train.rewards import columns_read, load_reward_funcs

        train, held = build_prompt_datasets(cfg.data, tok, cfg.train.max_prompt_length)
        funcs = load_reward_funcs(reward_funcs or cfg.train.reward_funcs or [])
        needed = {name: columns_read(fn) for name, fn in funcs}
        for ds in (train, held):
            if ds is not None:
                require_columns(ds, needed)
        return train, held
    if cfg.train.method != "sft":
        from velotune.data.preference import build_preference_datasets

        t = cfg.train
        return build_preference_datasets(cfg.data, tok, None, t.max_prompt_length, t.truncation_mode)
    try:
        return build_datasets(cfg.data, tok)
    except DataError as exc:
        extra = explain_untrainable(cfg.data, tok)
        if not extra:
            raise
        raise DataError(f"{exc}{extra}") from exc


@dataclass
class RunResult:
    run_dir: Path
    train: TrainResult
    before: Score | None
    after: Score | None
    eval_loss: float | None
    resumed_from: Path | None = None
    peak_memory: int | None = None  # bytes, CUDA only
    planned_memory: int | None = None
    plot_note: str = ""
    preference_before: dict | None = None  # dpo / orpo / simpo / grpo: eval metrics before and after training
    preference_after: dict | None = None


def _strategy(cfg: RunConfig, env: Any, device: torch.device, log: Callable[[str], Any]) -> str:
    """The strategy of a multi-process run: as configured, or for auto the memory plan's choice (read from the
    model's config alone, before any weight is loaded)."""
    if cfg.train.strategy != "auto":
        return cfg.train.strategy
    planned = usable = None
    if device.type == "cuda":
        model_cfg, _ = read_model_config(cfg.train.model_name_or_path)
        planned = estimate(model_cfg, setting_for(cfg, model_cfg)).total
        usable = usable_bytes(torch.cuda.get_device_properties(device).total_memory)
    strategy, why = choose_strategy(planned, usable)
    log(f"strategy auto: {strategy} ({why})")
    return strategy


def _plan(model: CausalLM, cfg: RunConfig, device: torch.device, log: Callable[[str], Any]) -> int | None:
    """On CUDA: the planner's prediction for this run, printed beside the device's memory."""
    if device.type != "cuda":
        return None
    est = estimate(model.config, replace(setting_for(cfg, model.config), checkpoint_layers=model.checkpoint_layers))
    capacity = torch.cuda.get_device_properties(device).total_memory
    fits = "fits" if est.total <= usable_bytes(capacity) else "may NOT fit (out-of-memory recovery will halve it)"
    log(
        f"memory plan: predicted peak {est.total / GiB:.1f} GiB of {capacity / GiB:.1f} GiB: {fits}; "
        "`velotune plan CONFIG` shows the parts and the fastest setting that fits"
    )
    torch.cuda.reset_peak_memory_stats(device)
    return est.total


def run(
    cfg: RunConfig, progress: bool = True, log: Callable[[str], Any] = print, faults: Faults | None = None
) -> RunResult:
    """Fine-tune as `cfg` says and write the run directory; returns what happened. Under torchrun, every process
    runs this; rank 0 alone writes files and messages."""
    check_paths(cfg)
    resume_from = find_checkpoint(cfg.train.resume, cfg.train.output_dir) if cfg.train.resume else None
    device = resolve_device(cfg.train.device)
    env = init_distributed(device, cfg.train.strategy)  # checks the process layout; under torchrun, joins the group
    device = env.device if env.distributed else device  # torchrun: this process's GPU (cuda:LOCAL_RANK)
    if not env.is_main:
        log = _quiet
    dtype = resolve_dtype(cfg.train.dtype, device)
    strategy = _strategy(cfg, env, device, log) if env.distributed else None
    # FSDP: the whole model goes to host memory first; sharding then moves one layer at a time to the GPU and keeps
    # this process's shard, so no GPU ever holds the whole model
    load_on = torch.device("cpu") if strategy == "fsdp" else device
    torch.manual_seed(cfg.train.seed)
    model, tok = load_quantized(
        cfg.train.model_name_or_path, cfg.train.quantization, dtype, load_on, quantize_on=device, progress=progress
    )
    run_dir = resume_from.parent if resume_from and not cfg.train.output_dir else run_dir_for(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = cfg.to_flat() | {"model_name_or_path": model.source or cfg.train.model_name_or_path}
    resolved["output_dir"] = str(run_dir)  # the directory actually used, so `--resume` finds it
    if resume_from:
        check_resume(resume_from, resolved, log)
        log(f"resuming from {resume_from}")
    else:
        rank0_only((run_dir / METRICS).unlink, missing_ok=True)
    rank0_only((run_dir / "config.yaml").write_text, yaml.safe_dump(resolved, sort_keys=False))
    rank0_only(write_status, run_dir, "running")

    train_ds, eval_ds = load_data(cfg, tok)
    data_report = train_ds.report()
    log(data_report)
    rank0_only((run_dir / DATA_REPORT).write_text, data_report + "\n")
    torch.manual_seed(cfg.train.seed)  # LoRA's initial weights: the same on every process
    prepare_model(model, cfg, log, device)
    parallel = Parallel(model, env, strategy, cfg.train.fsdp_offload_params)
    if parallel.note:
        log(parallel.note)
    trainable, total = num_parameters(model, trainable_only=True), num_parameters(model)
    quant = f", {model.quantization} base" if model.quantization else ""
    name = resolved["model_name_or_path"]
    log(f"model {name} on {device} ({dtype}{quant}): {trainable:,} of {total:,} parameters train")

    pad_id = tok.pad_token_id
    objective = build_objective(cfg.train, tok)
    samples = held_out_samples(cfg.data, cfg.train.compare_samples) if cfg.train.method == "sft" else []
    if samples:
        log(f"answering {len(samples)} held-out prompts with the base model ({cfg.train.max_new_tokens} new tokens)")
    before = score(model, tok, samples, cfg.data, cfg.train.max_new_tokens) if samples else None
    pref_before = _preference_score(objective, model, eval_ds, pad_id, cfg, log) if cfg.train.method != "sft" else None
    if cfg.train.precompute_ref_log_probs:
        train_ds = _precompute_reference(objective, model, train_ds, pad_id, cfg, log)
    integrations = open_integrations(cfg.train.report_to, run_dir, resolved, log) if env.is_main else []
    trainer = Trainer(
        model,
        train_ds,
        cfg.train,
        pad_id,
        run_dir,
        cfg.data.packing,
        cfg.data.max_seq_length,
        progress,
        eval_examples=eval_ds if cfg.train.eval_steps and eval_ds is not None and len(eval_ds) else None,
        config=resolved,
        objective=objective,
        callbacks=[faults] if faults else (),
        integrations=integrations,
        log=log,
        parallel=parallel,
    )
    if cfg.train.auto_batch_size:
        log(trainer.auto_micro_batch())
    planned = _plan(model, cfg, device, log)
    if planned:
        rank0_only(write_status, run_dir, "running", planned_gpu_memory_gib=round(planned / GiB, 3))
    result = trainer.train(resume_from)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    if peak is not None and planned:
        error = 100 * (planned / peak - 1)
        log(f"peak GPU memory {peak / GiB:.2f} GiB (planned {planned / GiB:.2f} GiB, {error:+.0f}%)")
    if cfg.train.load_best_model_at_end:
        _load_best(model, run_dir, result, log)
    if eval_ds is not None and len(eval_ds) or samples:
        log("evaluating the tuned model" + (f" and answering the {len(samples)} held-out prompts" if samples else ""))
    final = _final_eval(objective, eval_ds, pad_id, cfg, result, run_dir)
    eval_loss = final["eval_loss"] if final else None
    after = score(model, tok, samples, cfg.data, cfg.train.max_new_tokens) if samples else None
    pref_after = final if pref_before is not None else None  # the same objective over the same held-out pairs

    saved, weights, merged = model, None, True
    if env.distributed and strategy == "fsdp":  # rank 0 saves from gathered whole tensors
        saved, weights, merged = _gathered_for_saving(model, cfg, log)
    rank0_only(_save_outputs, saved, tok, cfg, run_dir, resolved["model_name_or_path"], dtype, weights, merged)
    out = RunResult(run_dir, result, before, after, eval_loss, resume_from, peak, planned)
    out.preference_before, out.preference_after = pref_before, pref_after
    out.plot_note = rank0_only(plot_metrics, run_dir / METRICS, run_dir / "training_curves.png") or ""
    summary = _summary(out)
    if samples and before and after:  # the questions beside the answers, for readers of summary.json
        summary["held_out"] = [{"prompt": s.prompt[-1]["content"], "reference": s.reference} for s in samples]
    rank0_only((run_dir / "summary.json").write_text, json.dumps(summary, indent=2))
    rank0_only(write_status, run_dir, "finished")
    return out


def _preference_score(
    objective: Any, model: CausalLM, eval_ds: Any, pad_id: int, cfg: RunConfig, log: Callable[[str], Any]
) -> dict | None:
    """Preference accuracy (chosen log-prob above rejected) and margins on the held-out pairs, or None without."""
    if eval_ds is None or not len(eval_ds) or cfg.train.compare_samples <= 0:
        return None
    if getattr(objective, "model", None) is None:  # before training; afterwards the reference must stay the start
        objective.setup(model)
    return objective.evaluate(list(eval_ds), pad_id, cfg.train.per_device_eval_batch_size)


def _precompute_reference(
    objective: Any, model: CausalLM, train_ds: Any, pad_id: int, cfg: RunConfig, log: Callable[[str], Any]
) -> list[dict]:
    """precompute_ref_log_probs: the reference log-probs of every training pair in one pass before training (the
    steps then run no reference forward); the same on every process."""
    if not hasattr(objective, "precompute"):
        raise ConfigError(
            f"precompute_ref_log_probs applies to method dpo (the others have no reference model), "
            f"not {cfg.train.method}; drop it"
        )
    if getattr(objective, "model", None) is None:
        objective.setup(model)
    start = time.perf_counter()
    out = objective.precompute(train_ds, pad_id, cfg.train.per_device_eval_batch_size)
    log(f"precompute_ref_log_probs: reference log-probs of {len(out):,} pairs in {time.perf_counter() - start:.1f} s")
    return out


def _same_structure(model: CausalLM, cfg: RunConfig) -> CausalLM:
    """An empty (meta) model with `model`'s modules: same config, same fine-tuning wrappers."""
    from velotune.models.load import build_empty

    copy = build_empty(model.config)
    prepare_model(copy, cfg, _quiet)
    return copy


def _quiet(*args: Any, **kwargs: Any) -> None:
    """`log` on ranks other than 0."""


def _load_best(model: CausalLM, run_dir: Path, result: TrainResult, log: Callable[[str], None]) -> None:
    """Put the best checkpoint's trained weights (lowest eval loss) back into `model` (every process: FSDP)."""
    from velotune.train.checkpoint import load_checkpoint
    from velotune.train.loop import load_trained

    if not result.best_checkpoint:
        log("load_best_model_at_end: no checkpoint was evaluated; the last step's weights are kept")
        return
    best = run_dir / result.best_checkpoint
    load_trained(model, None, load_checkpoint(best, with_optimizer=False))
    log(f"load_best_model_at_end: the outputs hold {best.name}, the lowest eval loss")


def _final_eval(
    objective: Any, eval_ds: Any, pad_id: int, cfg: RunConfig, result: TrainResult, run_dir: Path
) -> dict[str, float] | None:
    """The objective's eval metrics after training, also written as a metrics.jsonl row (unless the last step's
    periodic evaluation wrote one), so the curves PNG shows the eval loss the run prints."""
    if eval_ds is None or not len(eval_ds):
        return None
    metrics = objective.evaluate(eval_ds, pad_id, cfg.train.per_device_eval_batch_size)
    loss = metrics["eval_loss"]
    every = cfg.train.eval_steps
    if not every or result.steps % every:
        ppl = {"eval_ppl": math.exp(min(loss, 50.0))} if cfg.train.method == "sft" else {}
        rank0_only(_write_metrics, run_dir, {"step": result.steps} | metrics | ppl)
    return metrics


def _write_metrics(run_dir: Path, row: dict) -> None:
    metrics = MetricsLog(run_dir / METRICS)
    metrics.write(row)
    metrics.close()


def _gathered_for_saving(model: CausalLM, cfg: RunConfig, log: Callable[[str], None]) -> tuple:
    """(model to save from, whole LoRA weights or None, whether a merged model can be written) for an FSDP run; a
    collective. The adapter needs only the gathered LoRA weights; a merged or fully trained model needs a whole copy
    on rank 0, which 4-bit storage does not allow (its merged model comes from `velotune export RUN --format hf`)."""
    weights = full_trainable_state(model) if cfg.train.finetuning == "lora" else None
    if not (cfg.train.save_merged or cfg.train.finetuning != "lora"):
        return model, weights, True
    if model.quantization:
        log(
            f"save_merged: a {model.quantization} model sharded by FSDP is not merged here; after training run "
            "`velotune export <output_dir> --format hf` (one process) for the merged 16-bit model"
        )
        return model, weights, False
    whole = whole_model_on_rank0(model, lambda: _same_structure(model, cfg))
    return whole, weights, True


def _save_outputs(
    model: CausalLM,
    tok: Any,
    cfg: RunConfig,
    run_dir: Path,
    source: str,
    dtype: torch.dtype,
    weights: dict[str, torch.Tensor] | None = None,
    merged: bool = True,
) -> None:
    if cfg.train.finetuning == "lora":
        save_adapter(model, run_dir / "adapter", base_model=source, weights=weights)
        tok.save_pretrained(str(run_dir / "adapter"))
    if merged and (cfg.train.save_merged or cfg.train.finetuning != "lora"):
        from velotune.export.hf import save_hf

        merged = merge_lora(model) if cfg.train.finetuning == "lora" else model
        save_hf(merged, tok, run_dir / "merged", dtype=torch.bfloat16 if dtype != torch.float32 else torch.float32)


def _summary(out: RunResult) -> dict[str, Any]:
    tr = out.train
    summary: dict[str, Any] = {
        "steps": tr.steps,
        "first_loss": tr.losses[0] if tr.losses else None,
        "last_loss": tr.losses[-1] if tr.losses else None,
        "eval_loss": out.eval_loss,
        "tokens_per_second": round(tr.tokens_per_second, 1),
        "seconds": round(tr.seconds, 1),
        "resumed_from": str(out.resumed_from) if out.resumed_from else None,
        "skipped_steps": tr.skipped,
        "out_of_memory": tr.oom_events,
        "micro_batch_size": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.accumulation,
        "stopped_early": tr.stopped_early,
        "last_checkpoint": str(tr.last_checkpoint) if tr.last_checkpoint else None,
        "best_checkpoint": tr.best_checkpoint,
    }
    if out.peak_memory is not None:
        summary["peak_gpu_memory_gib"] = round(out.peak_memory / GiB, 3)
        summary["planned_gpu_memory_gib"] = round((out.planned_memory or 0) / GiB, 3)
    if out.preference_before and out.preference_after:
        summary["preference_before"], summary["preference_after"] = out.preference_before, out.preference_after
    if out.before and out.after:
        summary["before"] = {"correct": out.before.correct, "total": out.before.total, "answers": out.before.answers}
        summary["after"] = {"correct": out.after.correct, "total": out.after.total, "answers": out.after.answers}
    return summary
