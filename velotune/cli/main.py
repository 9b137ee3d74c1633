"""`velotune` command line: one subcommand per module in this package."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from velotune.cli import chat as chat_cmd
from velotune.cli import dashboard as dashboard_cmd
from velotune.cli import data as data_cmd
from velotune.cli import export as export_cmd
from velotune.cli import generate as generate_cmd
from velotune.cli import plan as plan_cmd
from velotune.cli import train as train_cmd
from velotune.errors import VelotuneError

COMMANDS = {
    "train": train_cmd,
    "generate": generate_cmd,
    "chat": chat_cmd,
    "data": data_cmd,
    "export": export_cmd,
    "plan": plan_cmd,
    "dashboard": dashboard_cmd,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="velotune", description="Fast, memory-lean LLM fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in COMMANDS.values():
        module.add_parser(sub)
    args, extra = parser.parse_known_args(argv)
    module = COMMANDS[args.command]
    if extra and not getattr(module, "ACCEPTS_OVERRIDES", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return module.run(args, extra) or 0
    except VelotuneError as exc:
        print(f"velotune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("velotune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
