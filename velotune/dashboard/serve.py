"""Serving the dashboard: bind the address first (so a port in use is one clear message), then run uvicorn on it."""

from __future__ import annotations

import errno
import ipaddress
import secrets
import socket
import threading
from pathlib import Path

import uvicorn

from velotune.dashboard import DEFAULT_HOST, DEFAULT_PORT
from velotune.dashboard.server import create_app
from velotune.errors import ConfigError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: a free one), or a ConfigError saying what to change."""
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port}: expected 0 to 65535 (0 picks a free port)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"--host {host!r}: not an address of this machine ({exc.strerror})") from exc
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"port {port} on {host} is in use (another dashboard or server?); choose another with --port N, "
                "or --port 0 for a free one"
            ) from exc
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise ConfigError(f"port {port} on {host}: permission denied; use a port above 1023") from exc
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc
    return sock


class Dashboard:
    """A dashboard bound to its address: `url` to open, `serve()` to answer requests until stopped. Bound to anything
    but loopback, or with `always_token` (a machine shared with other users), requests need the token in `url`."""

    def __init__(
        self, runs_dir: Path, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, always_token: bool = False
    ) -> None:
        if not runs_dir.is_dir():
            what = "is a file" if runs_dir.exists() else "does not exist"
            raise ConfigError(f"{runs_dir} {what}; give the directory that holds your runs (e.g. runs/)")
        self.runs_dir, self.host = runs_dir, host
        loopback = is_loopback(host)
        self.token = secrets.token_urlsafe(24) if always_token or not loopback else None
        self.sock = bind(host, port)
        self.port = self.sock.getsockname()[1]
        self.app = create_app(runs_dir, self.token, loopback)
        config = uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)

    @property
    def url(self) -> str:
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        shown = f"[{shown}]" if ":" in shown else shown
        return f"http://{shown}:{self.port}/" + (f"?token={self.token}" if self.token else "")

    def serve(self) -> None:
        """Answer requests until stop() (or Ctrl-C in the main thread)."""
        self._server.run(sockets=[self.sock])

    def start(self) -> threading.Thread:
        """serve() in a background thread (tests)."""
        thread = threading.Thread(target=self.serve, name="velotune-dashboard", daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._server.should_exit = True
