"""`velotune data inspect FILE`: how a dataset will be read, tokenized and masked, before training on it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from velotune.errors import ConfigError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("data", help="look at a dataset: format, rows, token lengths, masking")
    actions = p.add_subparsers(dest="data_command", required=True)
    i = actions.add_parser(
        "inspect",
        help="format, rows used and dropped, token-length histogram, masked examples",
        description="Tokenize FILE as training would (cached like training data) and show the detected format, "
        "rows used and dropped (and why), a token-length histogram (text, and PNG with matplotlib), how many "
        "rows exceed max_seq_length, and examples with the masked (non-target) text marked. Options carry the "
        "names of the training config keys.",
    )
    i.add_argument("file", help=".jsonl/.json/.csv/.parquet file, saved Hugging Face dataset directory or hub name")
    i.add_argument("--dataset_format", "--format", dest="format", default="auto", help="row format (default: detected)")
    i.add_argument(
        "--model", default=None, help="model or tokenizer: directory, .gguf file or hub id (default: SmolLM2)"
    )
    i.add_argument("--max_seq_length", type=int, default=2048, help="default: 2048")
    i.add_argument(
        "--chat_template",
        "--template",
        dest="template",
        default=None,
        help="built-in chat template instead of the tokenizer's",
    )
    i.add_argument("--train_on", default="responses", help="responses (assistant turns, the default) or all")
    i.add_argument("--system_prompt", default=None, help="system message for rows without one")
    i.add_argument("--field_map", default=None, help="rename fields, e.g. '{question: instruction}'")
    i.add_argument(
        "--dataset_split",
        "--split",
        dest="split",
        default=None,
        help="split of a Hugging Face dataset (default: train)",
    )
    i.add_argument("--max_prompt_length", type=int, default=512, help="preference pairs: prompt tokens kept")
    i.add_argument("--truncation_mode", default="keep_end", help="preference pairs: keep_end or keep_start of prompts")
    i.add_argument("--examples", type=int, default=3, help="examples to show (default 3)")
    i.add_argument(
        "--output",
        "--png",
        dest="output",
        default=None,
        help="histogram PNG path (default: <file stem>_token_lengths.png next to FILE)",
    )
    i.add_argument("--no_png", action="store_true", help="no PNG histogram")
    i.add_argument("--no_cache", action="store_true", help="do not read or write the tokenization cache")
    i.add_argument("--color", choices=("auto", "always", "never"), default="auto", help="dim masked text (auto: tty)")


def load_tokenizer(model: str | None) -> Any:
    """The tokenizer of `model` (directory, .gguf file, hub id), or of the embedded SmolLM2 when None."""
    from velotune.models.load import load_tokenizer as load
    from velotune.models.load import resolve_source

    path = resolve_source(model)
    if path.is_file() and path.suffix == ".gguf":
        return load(path.parent, gguf_file=path.name)
    return load(path)


def png_path(file: str, output: str | None) -> Path | None:
    """Where the histogram PNG goes: --output, else beside the data file or saved dataset directory; None for a hub
    dataset, which has no local place."""
    if output:
        return Path(output)
    data = Path(file.rstrip("/"))
    if not data.exists():
        return None
    return data.parent / f"{data.name.removesuffix(data.suffix) if data.is_file() else data.name}_token_lengths.png"


def _field_map(text: str | None) -> dict:
    if text is None:
        return {}
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(
            f"--field_map {text!r} is not valid YAML ({e}); write e.g. '{{question: instruction}}'"
        ) from e
    return value


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from velotune.data import DataConfig
    from velotune.data.preference import is_preference_file
    from velotune.data.sources import check_file

    if args.data_command != "inspect":
        raise ConfigError(f"unknown data command {args.data_command!r}; expected: inspect")
    cfg = DataConfig(
        path=args.file,
        format=args.format,
        max_seq_length=args.max_seq_length,
        template=args.template,
        train_on=args.train_on,
        system_prompt=args.system_prompt,
        field_map=_field_map(args.field_map),
        split=args.split,
        too_long="truncate",
        cache=not args.no_cache,
    )
    if is_preference_file(args.file, cfg.field_map, cfg.split):
        return _inspect_pairs(args, cfg)
    check_file(args.file, cfg)  # a missing, empty or malformed file is reported before the tokenizer loads
    return _inspect(args, cfg)


def _inspect_pairs(args: argparse.Namespace, cfg: Any) -> int:
    """Preference pairs: the pair report, lengths and rendered pairs (as dpo / orpo / simpo read them)."""
    import numpy as np

    from velotune.data.inspection import histogram_text
    from velotune.data.preference import build_preference_datasets, show_pair

    tokenizer = load_tokenizer(args.model)
    ds, _ = build_preference_datasets(cfg, tokenizer, None, args.max_prompt_length, args.truncation_mode)
    print(f"{args.file}: preference pairs; train on them with --method dpo (or orpo, simpo)")
    print(ds.report())
    print()
    print(histogram_text(np.asarray(ds.lengths), cfg.max_seq_length))
    for example in ds[: args.examples]:
        print(f"\n--- {example['row']}")
        print(show_pair(example, tokenizer))
    return 0


def _inspect(args: argparse.Namespace, cfg: Any) -> int:
    from velotune.data.inspection import histogram_png, histogram_text, inspect_data, show_example

    tokenizer = load_tokenizer(args.model)
    found = inspect_data(cfg, tokenizer, progress=sys.stderr.isatty())
    ds, s = found.dataset, found.dataset.stats
    print(f"{args.file}: format {s.format}")
    print(ds.report())
    over = found.over
    share = f" ({100 * over / len(found.lengths):.1f}%)" if len(found.lengths) else ""
    names = f", e.g. {', '.join(found.rows_over())}" if over else ""
    print(f"rows longer than max_seq_length {cfg.max_seq_length:,}: {over:,}{share}{names}")
    print()
    print(histogram_text(found.lengths, cfg.max_seq_length))
    if not args.no_png:
        out = png_path(args.file, args.output)
        if out is None:
            print("no PNG histogram: the data is not a local file; give --output PATH to write one")
        else:
            print(histogram_png(found.lengths, cfg.max_seq_length, out, title=args.file))
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    shown = min(args.examples, len(ds))
    if shown:
        how = "dimmed" if color else "wrapped in [masked]...[/masked]"
        print(f"\n{shown} example{'s' if shown > 1 else ''}, text the model does not learn from {how}:")
    for k in range(shown):
        example = ds[k]
        print(f"\n--- {example['row']} ({len(example['input_ids']):,} tokens)")
        print(show_example(example, tokenizer, color))
    return 0
