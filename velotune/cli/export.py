"""`velotune export RUN_DIR_OR_MODEL --format gguf|hf --quant q4_k_m [--quant q8_0 ...]`."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from velotune.errors import ExportError

FORMATS = ("gguf", "hf")


def add_parser(sub: Any) -> None:
    from velotune.export.gguf import QUANT_TYPES

    p = sub.add_parser("export", help="write a run or model as GGUF (+ Ollama Modelfile) or merged HF safetensors")
    p.add_argument("source", nargs="?", default=None, help="run directory, HF directory, .gguf file or hub id")
    p.add_argument("--format", default="gguf", help=f"one of: {', '.join(FORMATS)}")
    p.add_argument("--quant", action="append", help=f"GGUF type, repeatable: {', '.join(QUANT_TYPES)}")
    p.add_argument("--output_dir", default=None, help="default: <run>/gguf or <run>/merged")


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from velotune.cli.generate import load_for_generation
    from velotune.export.gguf import QUANT_TYPES

    if args.format not in FORMATS:
        raise ExportError(f"--format {args.format!r} is not supported; choose one of: {', '.join(FORMATS)}")
    quants = args.quant or ["q4_k_m"]
    bad = [q for q in quants if q not in QUANT_TYPES]
    if bad:
        raise ExportError(f"unknown quant type {bad[0]!r}; valid types: {', '.join(QUANT_TYPES)}")
    model, tok = load_for_generation(args.source)
    base = Path(args.source) if args.source and Path(args.source).is_dir() else Path("exports")
    if args.format == "hf":
        from velotune.export.hf import save_hf
        from velotune.export.pipeline import merged_copy

        out = save_hf(merged_copy(model), tok, Path(args.output_dir or base / "merged"))
        print(f"wrote {out}")
        return 0
    from velotune.export.pipeline import export_gguf_files

    for path in export_gguf_files(model, tok, args.output_dir or base / "gguf", quants):
        print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB)")
    print(f"wrote {path.parent / 'Modelfile'}: ollama create mymodel -f {path.parent / 'Modelfile'}")
    return 0
