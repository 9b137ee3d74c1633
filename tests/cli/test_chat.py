"""`velotune chat` in a pseudo-terminal: two turns answered with the chat template (the second with the first in
the conversation), streamed; /reset and /exit."""

from __future__ import annotations

import argparse
import os
import pty
import select
import sys
import time

from velotune.cli.generate import answer, load_for_generation, sampling_params

ARGS = ["--max_new_tokens", "6", "--temperature", "1.0"]  # sampled: a random tiny model greedily writes "\n"


class Terminal:
    """A child process on a pseudo-terminal: write lines, read until a marker appears."""

    def __init__(self, argv: list[str]) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the velotune command line
            os.execv(sys.executable, [sys.executable, "-m", "velotune", *argv])
        self.seen = ""

    def expect(self, marker: str, timeout: float = 300) -> str:
        """Output up to and including the next `marker` (terminal line ends as \\n)."""
        deadline = time.monotonic() + timeout
        while marker not in self.seen:
            ready, _, _ = select.select([self.fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise AssertionError(f"no {marker!r} within {timeout} s; the terminal shows:\n{self.seen}")
            try:
                chunk = os.read(self.fd, 4096).decode(errors="replace")
            except OSError:  # EIO: the child closed the terminal
                chunk = ""
            if not chunk:
                raise AssertionError(f"the command ended before {marker!r}; the terminal shows:\n{self.seen}")
            self.seen += chunk.replace("\r\n", "\n")
        head, _, self.seen = self.seen.partition(marker)
        return head + marker

    def send(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())

    def exit_code(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.1)
        os.kill(self.pid, 9)
        raise AssertionError("the chat did not exit")


def _expected_replies(model_dir, turns: list[str]) -> list[str]:
    """What the chat must answer: the same engine call on the same conversation, in this process."""
    model, tok = load_for_generation(str(model_dir))
    args = argparse.Namespace(
        max_new_tokens=6, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0, stop=[], seed=0
    )
    args.chat_template, args.system = None, None
    messages, replies = [], []
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        with open(os.devnull, "w") as sink:
            stdout, sys.stdout = sys.stdout, sink
            try:
                replies.append(answer(model, tok, messages, args, sampling_params(args, tok)))
            finally:
                sys.stdout = stdout
        messages.append({"role": "assistant", "content": replies[-1]})
    return replies


def test_chat_answers_two_turns_then_resets_and_exits(tiny_model_dir):
    turns = ["What is the capital of France?", "And of Italy?"]
    first, second = _expected_replies(tiny_model_dir, turns)
    term = Terminal(["chat", str(tiny_model_dir), *ARGS])
    term.expect(">>> ")
    for turn, reply in zip(turns, (first, second), strict=True):
        term.send(turn)
        shown = term.expect(">>> ")
        assert reply.strip() and reply in shown, shown
    term.send("/reset")
    assert "(new conversation)" in term.expect(">>> ")
    term.send(turns[0])
    assert first in term.expect(">>> ")  # the first answer again: the conversation started over
    term.send("/exit")
    assert term.exit_code() == 0
