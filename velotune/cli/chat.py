"""`velotune chat RUN_OR_MODEL`: a multi-turn conversation in the terminal with the model's chat template.

Each reply streams as it is generated; the whole conversation is the next prompt. `/reset` starts over, `/exit`
(or end of input) quits.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from velotune.cli.generate import add_sampling_arguments, answer, load_for_generation, sampling_params
from velotune.errors import ConfigError

HELP = "type a message; /reset starts a new conversation, /exit quits"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("chat", help="chat with a run directory or a model in the terminal")
    add_sampling_arguments(p)


def _read(prompt: str) -> str | None:
    try:
        return input(prompt)
    except EOFError:
        return None


def run(args: argparse.Namespace, extra: list[str]) -> int:
    sampling_params(args, None)  # bad values fail before the model loads
    model, tok = load_for_generation(args.source)
    params = sampling_params(args, tok)
    print(HELP, flush=True)
    messages: list[dict] = []
    while True:
        line = _read(">>> ")
        if line is None or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = []
            print("(new conversation)", flush=True)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        try:
            reply = answer(model, tok, messages, args, params)
        except ConfigError as exc:  # e.g. the conversation outgrew the context: say so, keep the session
            messages.pop()
            print(f"velotune: {exc} (/reset starts a new conversation)", file=sys.stderr, flush=True)
            continue
        messages.append({"role": "assistant", "content": reply})
