"""`velotune train [CONFIG.yaml] [--key value ...]`: fine-tune; without arguments, the embedded demo.

`--resume` continues the run in output_dir from its latest checkpoint (`--resume PATH`: from that checkpoint), with
the settings saved in the checkpoint unless given again. SIGINT/SIGTERM stop after the current step with a
checkpoint, printing the command that resumes. VELOTUNE_FAULTS injects failures for tests (train/faults.py).
`--nproc N` re-runs the command under torchrun with N processes on this host (`--strategy auto|ddp|fsdp`, a config
key, says how they share the model); per_device_train_batch_size is per process, so the global batch is N times it.
`--help` lists every config key with its description, default and choices, read from the config dataclasses.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import yaml

from velotune import env
from velotune.errors import ConfigError
from velotune.train.config import (
    ALIASES,
    KEYS,
    LORA_HELP,
    SECTIONS,
    load_yaml,
    run_config_from_dict,
    with_defaults,
)

ACCEPTS_OVERRIDES = True
# what a run directory holds before the first training step; a run interrupted then leaves nothing behind
STARTED_ONLY = {"config.yaml", "metrics.jsonl", "status.json", "data_report.txt"}


SECTION_TITLES = {"train": "training", "lora": "LoRA", "data": "data"}


def show_value(value: Any) -> str:
    """A default as it would be written on the command line or in YAML."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    return str(value)


def key_field(key: str) -> dataclasses.Field:
    """The config dataclass field behind a flat key."""
    section, name = KEYS[key]
    return {f.name: f for f in dataclasses.fields(SECTIONS[section])}[name]


def key_default(key: str) -> Any:
    f = key_field(key)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def key_lines() -> str:
    """One line per config key: what it does, its allowed values, its default (all from the dataclass fields)."""
    aliases: dict[str, list[str]] = {}
    for alias, target in ALIASES.items():
        aliases.setdefault(target, []).append(alias)
    keys = [k for k in KEYS if k not in ALIASES]
    width = max(map(len, keys)) + 2
    lines = []
    for section, title in SECTION_TITLES.items():
        lines.append(f"{title} keys:")
        for key in (k for k in keys if KEYS[k][0] == section):
            f = key_field(key)
            text = f.metadata.get("help") or LORA_HELP.get(key, "")
            choices = f.metadata.get("choices", ())
            text += f"; one of: {', '.join(choices)}" if choices else ""
            text += f" (default: {show_value(key_default(key))})"
            text += f" (also --{', --'.join(aliases[key])})" if key in aliases else ""
            lines.append(f"  --{key:<{width}}{text}")
        lines.append("")
    return "\n".join(lines).rstrip()


def add_parser(sub: Any) -> None:
    demo = {k: v for k, v in with_defaults({}).items() if k not in ("dataset", "eval_dataset")}
    p = sub.add_parser(
        "train",
        help="fine-tune a model (no arguments: the embedded SmolLM2 demo)",
        description="Fine-tune a model. Any config key below can be set in the YAML file or given as --key value, "
        "which overrides the file; true/false keys may be given alone (--auto_batch_size). Without a dataset, the "
        "bundled ISO-date demo trains, with "
        + ", ".join(f"{k} {show_value(v)}" for k, v in demo.items())
        + ". --resume continues the run in output_dir from its latest checkpoint, --resume PATH from that "
        "checkpoint.",
        epilog=key_lines(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.usage = (
        "velotune train [CONFIG.yaml] [--key value ...] [--resume [PATH]] [--no_progress] [--nproc N] "
        "[--strategy auto|ddp|fsdp]"
    )
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        metavar="N",
        help="train on N processes of this host (torchrun; one per GPU on CUDA); --strategy says how they share "
        "the model",
    )


def _is_flag(key: str) -> bool:
    """Keys that may be given without a value (meaning true): the true/false ones, and resume."""
    if key not in KEYS:
        return False
    section, name = KEYS[key]
    hint = typing.get_type_hints(SECTIONS[section])[name]
    return hint is bool or bool in typing.get_args(hint)


def parse_overrides(extra: list[str]) -> dict[str, Any]:
    """`--key value` and `--key=value` pairs; values are read as YAML scalars (numbers, true/false, lists)."""
    out: dict[str, Any] = {}
    i = 0
    while i < len(extra):
        arg = extra[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; overrides are written --key value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(extra) or extra[i + 1].startswith("--"):
                if not _is_flag(key):
                    raise ConfigError(f"--{key} needs a value")
                out[key] = True
                i += 1
                continue
            value = extra[i + 1]
            i += 1
        try:
            out[key] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            out[key] = value
        i += 1
    return out


def resolve_values(config: str | None, extra: list[str]) -> dict[str, Any]:
    """The run's flat config: YAML, then overrides; resuming, the checkpoint's saved settings underneath both."""
    from velotune.train.checkpoint import find_checkpoint, saved_config

    values = load_yaml(config) if config else {}
    values.update(parse_overrides(extra))
    values = {ALIASES.get(k, k): v for k, v in values.items()}
    if values.get("resume") in (None, False):
        return with_defaults(values)
    checkpoint = find_checkpoint(values["resume"], values.get("output_dir"))
    merged = saved_config(checkpoint) | values
    merged["resume"] = str(checkpoint)
    merged["output_dir"] = values.get("output_dir") or str(checkpoint.parent)
    return merged


def resume_command(config: str | None, extra: list[str], run_dir: Path, no_progress: bool) -> str:
    """The command line that continues this run: the same arguments, the run directory, and --resume."""
    kept: list[str] = []
    i = 0
    while i < len(extra):
        key = extra[i][2:].partition("=")[0] if extra[i].startswith("--") else None
        has_value = "=" not in extra[i] and i + 1 < len(extra) and not extra[i + 1].startswith("--")
        if key in ("resume", "output_dir"):
            i += 2 if has_value else 1
            continue
        kept.append(extra[i])
        i += 1
    args = ["velotune", "train", *([config] if config else []), *kept, "--output_dir", str(run_dir), "--resume"]
    return shlex.join(args + (["--no_progress"] if no_progress else []))


def _launch(args: argparse.Namespace, config: str | None, extra: list[str], cfg: Any) -> int | None:
    """With --nproc N > 1 outside torchrun: check the layout, run this command under torchrun and return its exit
    code; None when this process trains itself."""
    import torch

    from velotune.train import distributed

    # without --nproc: torchrun's parser rejects it as an abbreviation of its --nproc-per-node (the processes it
    # starts know they are inside torchrun, so they train)
    argv = ["train", *([config] if config else []), *extra]
    cmd = distributed.launch_command(args.nproc, argv + (["--no_progress"] if args.no_progress else []))
    if cmd is None:
        return None
    device = cfg.train.device
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    gpus = torch.cuda.device_count() if cuda else 0
    distributed.check_layout(args.nproc, cfg.train.strategy, "cuda" if cuda else "cpu", gpus)
    code = subprocess.run(cmd).returncode
    if code != 0:
        from velotune.train.checkpoint import list_checkpoints

        run_dir = Path(cfg.train.output_dir) if cfg.train.output_dir else None
        newest = list_checkpoints(run_dir)[-1:] if run_dir else []
        resume = (
            f"; resume from {newest[0].name} with:\n  {resume_command(config, extra, run_dir, args.no_progress)}"
            if newest
            else "; no checkpoint was written yet"
        )
        print(
            f"velotune: training on {args.nproc} processes failed (exit status {code}): every process was stopped, "
            f"see the rank's error above{resume}",
            file=sys.stderr,
        )
    return code


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from velotune.train.distributed import check_layout, launched_by_torchrun, rank0_only, shutdown
    from velotune.train.faults import Faults
    from velotune.train.loop import TrainingInterrupted
    from velotune.train.run import run as run_training

    config = extra.pop(0) if extra and not extra[0].startswith("--") else None
    original = list(extra)
    cfg = run_config_from_dict(resolve_values(config, extra), source=config or "command line")
    if not cfg.train.output_dir:  # the directory is fixed now: config.yaml, torchrun's processes and resume see it
        from velotune.train.run import run_dir_for

        cfg.train.output_dir = str(run_dir_for(cfg))
        original += ["--output_dir", cfg.train.output_dir]
    code = _launch(args, config, original, cfg)
    if code is not None:
        return code
    if not launched_by_torchrun():
        check_layout(1, cfg.train.strategy, "cpu", 0)  # refuses fsdp on 1 process before loading anything
    faults = Faults.parse(env.faults_spec())
    try:
        result = run_training(cfg, progress=not args.no_progress, faults=faults)
    except TrainingInterrupted as stop:
        run_dir = stop.checkpoint.parent if stop.checkpoint else Path(cfg.train.output_dir or ".")
        command = resume_command(config, original, run_dir, args.no_progress)
        print(f"\nvelotune: {stop}", file=sys.stderr)
        print(f"resume with:\n  {command}", file=sys.stderr)
        _final_status(run_dir, "interrupted", resume_command=command, message=str(stop))
        return 128 + stop.signum
    except KeyboardInterrupt:  # before training started (loading, tokenizing, the before-answers)
        _interrupted_early(Path(cfg.train.output_dir), config, original, args.no_progress)
        return 130
    except Exception as exc:
        if launched_by_torchrun():  # one line naming the rank; torchrun then stops the other processes
            rank, world = env.launch_position()
            print(f"velotune: rank {rank} of {world} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        _final_status(Path(cfg.train.output_dir), "failed", error=f"{type(exc).__name__}: {exc}")
        raise
    rank0_only(_report, result, cfg)
    shutdown()
    return 0


def _final_status(run_dir: Path, status: str, **fields: Any) -> None:
    """status.json of a run that stopped, if this process started it (its status.json says running with this pid;
    not so when the run failed before it began, or on ranks other than 0)."""
    from velotune.train.status import STATUS, write_status

    try:
        started = json.loads((run_dir / STATUS).read_text())
    except (OSError, ValueError):
        return
    if started.get("status") == "running" and started.get("pid") == os.getpid():
        write_status(run_dir, status, **fields)


def _interrupted_early(run_dir: Path, config: str | None, extra: list[str], no_progress: bool) -> None:
    """Ctrl-C outside the training loop: the resume command when a checkpoint exists; otherwise say that nothing
    was trained, and remove a run directory that holds nothing but its config."""
    from velotune.train.checkpoint import list_checkpoints

    if run_dir.is_dir() and list_checkpoints(run_dir):
        command = resume_command(config, extra, run_dir, no_progress)
        print(f"\nvelotune: interrupted; resume with:\n  {command}", file=sys.stderr)
        _final_status(run_dir, "interrupted", resume_command=command, message="interrupted before training resumed")
        return
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= STARTED_ONLY:
        for p in run_dir.iterdir():
            p.unlink()
        run_dir.rmdir()
    print(
        "\nvelotune: interrupted before the first training step; nothing was trained or saved (run the same "
        "command again to start over)",
        file=sys.stderr,
    )


def _report(result: Any, cfg: Any) -> None:
    tr = result.train
    first, last = (f"{tr.losses[0]:.4f}", f"{tr.losses[-1]:.4f}") if tr.losses else ("-", "-")
    speed = f"{tr.seconds:.0f} s ({tr.tokens_per_second:.0f} tokens/s)"
    print(f"\ntrained {tr.steps} step{'s' if tr.steps != 1 else ''} in {speed}; loss {first} -> {last}")
    if tr.skipped:
        print(f"skipped {len(tr.skipped)} steps with a non-finite loss or gradient norm (see metrics.jsonl)")
    if tr.stopped_early:
        print(f"stopped early (early_stopping_patience); best checkpoint: {tr.best_checkpoint}")
    if result.eval_loss is not None:
        print(f"eval loss {result.eval_loss:.4f}")
    if result.preference_before and result.preference_after and "eval_reward" in result.preference_before:
        b, a = result.preference_before, result.preference_after
        names = [k[len("eval_rewards/") : -len("/mean")] for k in b if k.startswith("eval_rewards/")]
        print("\nbefore/after on the held-out prompts (mean reward of one greedy completion each):")
        for name, m in (("base", b), ("tuned", a)):
            parts = ", ".join(f"{n} {m[f'eval_rewards/{n}/mean']:.3f}" for n in names)
            print(f"  {name:<5} reward {m['eval_reward']:.3f}" + (f" ({parts})" if len(names) > 1 else ""))
    elif result.preference_before and result.preference_after:
        b, a = result.preference_before, result.preference_after
        print("\nbefore/after on the held-out pairs (chosen log-prob above rejected; reward margin vs the reference):")
        for name, m in (("base", b), ("tuned", a)):
            acc, margin = m.get("eval_preference_accuracy", 0.0), m.get("eval_rewards/margins", 0.0)
            print(f"  {name:<5} preference accuracy {acc:.0%}, reward margin {margin:+.3f}")
    if result.before and result.after:
        b, a = result.before, result.after
        print(f"\nbefore/after on {b.total} held-out prompts (exact match):")
        print(f"  base  {b.correct:>3}/{b.total} ({b.accuracy:.0%})")
        print(f"  tuned {a.correct:>3}/{a.total} ({a.accuracy:.0%})")
        from velotune.train.compare import held_out_samples

        samples = held_out_samples(cfg.data, 3)
        for s, ba, aa in zip(samples, b.answers, a.answers, strict=False):
            print(f"  prompt: {s.prompt[-1]['content']}\n    reference: {s.reference}")
            print(f"    base:  {ba!r}\n    tuned: {aa!r}")
    outputs = ["adapter/ (PEFT)"] if (result.run_dir / "adapter").exists() else []
    outputs += ["merged/"] if (result.run_dir / "merged").exists() else []
    outputs += ["checkpoint-*/"] if tr.last_checkpoint else []
    outputs += ["metrics.jsonl", "config.yaml", "summary.json"]
    outputs += ["training_curves.png"] if (result.run_dir / "training_curves.png").exists() else []
    print(f"\nsaved to {result.run_dir}/: {', '.join(outputs)}")
    if result.plot_note and "training_curves.png" not in outputs:
        print(result.plot_note)
    print(f'try it: velotune generate {result.run_dir} --prompt "..."')
