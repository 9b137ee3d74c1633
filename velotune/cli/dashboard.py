"""`velotune dashboard [RUNS_DIR]`: watch, compare and try runs in the browser (a local web page)."""

from __future__ import annotations

import argparse
import socket
from pathlib import Path
from typing import Any

from velotune.dashboard import DEFAULT_HOST, DEFAULT_PORT


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "dashboard",
        help="watch, compare and try runs in the browser",
        description="Serve a web page of the runs under RUNS_DIR: live curves, status, config, data report, "
        "before/after answers, checkpoints, comparisons and a chat with a run's model. Read-only apart from the "
        "chat. Bound to anything but loopback, the address carries a token.",
    )
    p.add_argument("runs_dir", nargs="?", default="runs", help="directory holding run directories (default: runs)")
    p.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default: {DEFAULT_HOST})")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"default: {DEFAULT_PORT}; 0 picks a free one")
    p.add_argument(
        "--token",
        action="store_true",
        help="require the token in the address on loopback too (a machine shared with other users)",
    )


def run(args: argparse.Namespace, extra: list[str]) -> int:
    from velotune.dashboard.serve import Dashboard, is_loopback

    dashboard = Dashboard(Path(args.runs_dir), args.host, args.port, args.token)
    print(f"velotune dashboard of {Path(args.runs_dir).resolve()} at {dashboard.url}", flush=True)
    if dashboard.token and not is_loopback(args.host):
        where = f"http://{socket.gethostname()}:{dashboard.port}/?token={dashboard.token}"
        print(f"from other machines: {where} (anyone with this address can read the runs)", flush=True)
    print("Ctrl-C stops it", flush=True)
    try:
        dashboard.serve()
    except KeyboardInterrupt:  # uvicorn stops gracefully on Ctrl-C, then passes it on
        pass
    print("dashboard stopped", flush=True)
    return 0
