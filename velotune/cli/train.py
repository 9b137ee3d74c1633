"""`velotune train [CONFIG.yaml] [--key value ...]`: fine-tune; without arguments, the embedded demo."""

from __future__ import annotations

import argparse
from typing import Any

import yaml

from velotune.errors import ConfigError
from velotune.train.config import KEYS, load_yaml, run_config_from_dict, with_defaults

ACCEPTS_OVERRIDES = True


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a model (no arguments: the embedded SmolLM2 demo)",
        description="Fine-tune a model. Any config key can be given as --key value and overrides the YAML file. "
        f"Keys: {', '.join(sorted(KEYS))}.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.usage = "velotune train [CONFIG.yaml] [--key value ...] [--no_progress]"
    p.add_argument("--no_progress", action="store_true", help="no progress bar")


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
                raise ConfigError(f"--{key} needs a value")
            value = extra[i + 1]
            i += 1
        try:
            out[key] = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            out[key] = value
        i += 1
    return out


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from velotune.train.run import run as run_training

    config = extra.pop(0) if extra and not extra[0].startswith("--") else None
    values = load_yaml(config) if config else {}
    values.update(parse_overrides(extra))
    cfg = run_config_from_dict(with_defaults(values), source=config or "command line")
    result = run_training(cfg, progress=not args.no_progress)
    tr = result.train
    print(
        f"\ntrained {tr.steps} steps in {tr.seconds:.0f} s ({tr.tokens_per_second:.0f} tokens/s); "
        f"loss {tr.losses[0]:.4f} -> {tr.losses[-1]:.4f}"
    )
    if result.eval_loss is not None:
        print(f"eval loss {result.eval_loss:.4f}")
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
    print(
        f"\nsaved to {result.run_dir}/: adapter/ (PEFT), metrics.jsonl, config.yaml, summary.json"
        + (", merged/" if (result.run_dir / "merged").exists() else "")
    )
    print(f'try it: velotune generate {result.run_dir} --prompt "..."')
    return 0
