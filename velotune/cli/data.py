"""`velotune data inspect FILE`: how a dataset will be read, tokenized and masked, before training on it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from velotune.errors import ConfigError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("data", help="look at a dataset: format, rows, token lengths, masking")
    actions = p.add_subparsers(dest="data_command", required=True)
    i = actions.add_parser(
        "inspect",
        help="format, rows used and dropped, token-length histogram, masked examples",
        description="Tokenize FILE as training would (cached like training data) and show the detected format, "
        "rows used and dropped (and why), a token-length histogram (text, and PNG with matplotlib), how many "
        "rows exceed max_seq_length, and examples with the masked (non-target) text marked.",
    )
    i.add_argument("file", help=".jsonl/.json/.csv/.parquet file, saved Hugging Face dataset directory or hub name")
    i.add_argument("--format", default="auto", help="row format (default: detected from the first row)")
    i.add_argument(
        "--model", default=None, help="model or tokenizer: directory, .gguf file or hub id (default: SmolLM2)"
    )
    i.add_argument("--max_seq_length", type=int, default=2048)
    i.add_argument("--template", default=None, help="built-in chat template instead of the tokenizer's")
    i.add_argument("--train_on", default="responses", help="responses (assistant turns) or all")
    i.add_argument("--system_prompt", default=None, help="system message for rows without one")
    i.add_argument("--split", default=None, help="split of a Hugging Face dataset (default: train)")
    i.add_argument("--examples", type=int, default=3, help="examples to show (default 3)")
    i.add_argument("--png", default=None, help="histogram PNG path (default: <file stem>_token_lengths.png)")
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


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from velotune.data import DataConfig
    from velotune.data.inspection import histogram_png, histogram_text, inspect_data, show_example

    if args.data_command != "inspect":
        raise ConfigError(f"unknown data command {args.data_command!r}; expected: inspect")
    cfg = DataConfig(
        path=args.file,
        format=args.format,
        max_seq_length=args.max_seq_length,
        template=args.template,
        train_on=args.train_on,
        system_prompt=args.system_prompt,
        split=args.split,
        too_long="truncate",
        cache=not args.no_cache,
    )
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
        out = Path(args.png) if args.png else Path(f"{Path(args.file.rstrip('/')).stem}_token_lengths.png")
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
