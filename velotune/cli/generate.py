"""`velotune generate RUN_DIR_OR_MODEL --prompt ...`: chat-templated generation, streamed token by token."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from velotune.errors import ModelLoadError


def add_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate from a run directory or a model, chat template applied")
    p.add_argument("source", nargs="?", default=None, help="run directory, HF directory, .gguf file or hub id")
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--chat_template", default=None, help="built-in template name instead of the tokenizer's")
    p.add_argument("--seed", type=int, default=0)


def load_for_generation(source: str | None) -> tuple[Any, Any]:
    """Model + tokenizer from a run directory (merged model, or base + adapter) or any model source."""
    from velotune.lora.peft_format import load_adapter
    from velotune.models.load import load_model

    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = Path(source) if source else None
    if path is not None and (path / "config.yaml").exists() and not (path / "config.json").exists():
        if (path / "merged").exists():
            return load_model(path / "merged", dtype, device)
        if not (path / "adapter").exists():
            raise ModelLoadError(f"{path}: run directory without adapter/ or merged/; was the run finished?")
        base = yaml.safe_load((path / "config.yaml").read_text()).get("model_name_or_path")
        model, tok = load_model(base, dtype, device)
        load_adapter(model, path / "adapter")
        return model, tok
    return load_model(source, dtype, device)


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from velotune.data import render_prompt
    from velotune.models.generate import generate, stop_token_ids

    model, tok = load_for_generation(args.source)
    messages = [{"role": "user", "content": args.prompt}]
    if args.system:
        messages.insert(0, {"role": "system", "content": args.system})
    ids = tok(render_prompt(messages, tok, args.chat_template), add_special_tokens=False)["input_ids"]
    new: list[int] = []
    printed = 0

    def stream(token: int) -> None:
        nonlocal printed
        new.append(token)
        text = tok.decode(new, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[printed:])
            sys.stdout.flush()
            printed = len(text)

    generate(
        model,
        ids,
        args.max_new_tokens,
        args.temperature,
        args.top_k,
        args.top_p,
        args.repetition_penalty,
        stop_token_ids(tok),
        on_token=stream,
        seed=args.seed,
    )
    sys.stdout.write("\n")
    return 0
