"""`velotune generate RUN_DIR_OR_MODEL --prompt ...`: chat-templated generation, streamed token by token."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from velotune.errors import ConfigError
from velotune.train.load_run import load_for_generation


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by `generate` and `chat`."""
    p.add_argument("source", nargs="?", default=None, help="run directory, HF directory, .gguf file or hub id")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top_p", type=float, default=1.0)
    p.add_argument("--top_k", type=int, default=0)
    p.add_argument("--min_p", type=float, default=0.0)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); the answer ends before it")
    p.add_argument("--chat_template", default=None, help="built-in template name instead of the tokenizer's")
    p.add_argument("--seed", type=int, default=0)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("generate", help="generate from a run directory or a model, chat template applied")
    add_sampling_arguments(p)
    p.add_argument("--prompt", required=True, help="the user message")


def sampling_params(args: argparse.Namespace, tokenizer: Any) -> Any:
    """The engine's parameters from the command line (checked before the model loads: call with tokenizer None)."""
    from velotune.models.generate import SamplingParams, stop_token_ids

    return SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        repetition_penalty=args.repetition_penalty,
        eos_token_ids=stop_token_ids(tokenizer) if tokenizer is not None else (),
        stop_strings=args.stop,
        seed=args.seed,
    )


class TextStream:
    """Prints the text of a growing token sequence as it comes: whole characters only, and never past a stop
    string (text that could still become one is held back until it cannot)."""

    def __init__(self, tokenizer: Any, stops: list[str], out: Any = None) -> None:
        self.tokenizer, self.stops, self.out = tokenizer, stops, out or sys.stdout
        self.tokens: list[int] = []
        self.printed = 0

    def __call__(self, row: int, tokens: list[int]) -> None:
        self.tokens.extend(tokens)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            return
        self._write(text[: self._safe_end(text)])

    def finish(self, text: str) -> None:
        """The final answer (cut before a stop string): print what is left of it."""
        self._write(text)
        self.out.write("\n")
        self.out.flush()

    def _safe_end(self, text: str) -> int:
        end = len(text)
        for stop in self.stops:
            hit = text.find(stop)
            if hit >= 0:
                end = min(end, hit)
            for k in range(min(len(stop) - 1, len(text)), 0, -1):  # the text ends with the start of a stop string
                if stop.startswith(text[-k:]):
                    end = min(end, len(text) - k)
                    break
        return end

    def _write(self, text: str) -> None:
        if len(text) > self.printed:
            self.out.write(text[self.printed :])
            self.out.flush()
            self.printed = len(text)


def answer(model: Any, tok: Any, messages: list[dict], args: argparse.Namespace, params: Any) -> str:
    """Stream the model's reply to a conversation; returns the reply's text."""
    from velotune.data import render_prompt
    from velotune.models.generate import generate_batch

    ids = tok(render_prompt(messages, tok, args.chat_template, args.system), add_special_tokens=False)["input_ids"]
    stream = TextStream(tok, list(params.stop_strings))
    done = generate_batch(model, [ids], params, tokenizer=tok, on_tokens=stream)[0]
    stream.finish(done.text)
    return done.text


def run(args: argparse.Namespace, extra: list[str]) -> int:
    if not args.prompt.strip():
        raise ConfigError("--prompt is empty; give the message to answer, e.g. --prompt 'What is 2 + 2?'")
    sampling_params(args, None)  # bad values fail before the model loads
    model, tok = load_for_generation(args.source)
    answer(model, tok, [{"role": "user", "content": args.prompt}], args, sampling_params(args, tok))
    return 0
