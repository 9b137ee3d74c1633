"""The dashboard's web application (Starlette): the page, its static files, a JSON API over the runs directory,
and files under the runs directory. Read-only, besides the chat pane's answers."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from velotune.dashboard.chat import Chat
from velotune.dashboard.compare import config_differences
from velotune.dashboard.paths import NotFound, Refused, inside
from velotune.dashboard.runs import RunsDir, read_config
from velotune.errors import VelotuneError

STATIC = Path(__file__).parent / "static"
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
COOKIE = "velotune_dashboard_token"
NO_STORE = {"Cache-Control": "no-store"}


def _json(value: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(value, status_code=status, headers=NO_STORE)


class Api:
    """The JSON endpoints: runs list, a run, its metrics rows, a comparison, a chat answer."""

    def __init__(self, runs: RunsDir, chat: Chat) -> None:
        self.runs, self.chat = runs, chat

    def list_runs(self, request: Request) -> Response:
        return _json({"root": str(self.runs.root), "runs": [self.runs.row(p) for p in self.runs.find()]})

    def run(self, request: Request) -> Response:
        return _json(self.runs.details(self.runs.run(request.query_params.get("run", ""))))

    def metrics(self, request: Request) -> Response:
        """Rows from index `since` on, if the client's `generation` is the file's (else from the start)."""
        run_dir = self.runs.run(request.query_params.get("run", ""))
        file = self.runs.metrics(run_dir)
        since = max(0, _int(request.query_params.get("since"), 0))
        if _int(request.query_params.get("generation"), -1) != file.generation:
            since = 0
        rows = file.since(since)
        return _json(
            {
                "generation": file.generation,
                "since": since,
                "rows": rows,
                "next": since + len(rows),
                "bad_lines": file.bad_lines,
                "pending": file.pending,
            }
        )

    def compare(self, request: Request) -> Response:
        names = request.query_params.getlist("run")
        configs = {name: read_config(self.runs.run(name))[0] for name in names}
        return _json({"runs": names, "differences": config_differences(configs)})

    async def answer(self, request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _json({"error": "send the message as application/json"}, 415)
        try:
            body = await request.json()
        except ValueError:
            return _json({"error": "the request body is not valid JSON"}, 400)
        if not isinstance(body, dict):
            return _json({"error": "expected a JSON object with run and messages"}, 400)
        run_dir = self.runs.run(str(body.get("run", "")))
        args = (run_dir, body.get("checkpoint"), body.get("messages"))
        kwargs = {"max_new_tokens": body.get("max_new_tokens", 128), "temperature": body.get("temperature", 0.0)}
        text = await run_in_threadpool(self.chat.answer, *args, **kwargs)
        return _json({"text": text})

    def file(self, request: Request) -> Response:
        path = inside(self.runs.root, request.path_params["path"])
        if not path.is_file():
            raise NotFound(f"no file {request.path_params['path']!r}")
        return FileResponse(path)


def _int(text: str | None, default: int) -> int:
    try:
        return int(text or "")
    except ValueError:
        return default


def _index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers=NO_STORE)


async def _refused(request: Request, exc: Exception) -> Response:
    return _json({"error": "refused: only files under the runs directory are served"}, 403)


async def _not_found(request: Request, exc: Exception) -> Response:
    return _json({"error": str(exc)}, 404)


async def _user_error(request: Request, exc: Exception) -> Response:
    return _json({"error": str(exc)}, 400)


def create_app(root: Path, token: str | None = None, loopback: bool = True, chat: Chat | None = None) -> Any:
    """The application serving `root`: with `token`, every request must carry it (in the address once; a cookie
    then); on loopback, requests must name a loopback host (no DNS rebinding from a web page)."""
    api = Api(RunsDir(root), chat or Chat())
    routes = [
        Route("/", _index),
        Route("/api/runs", api.list_runs),
        Route("/api/run", api.run),
        Route("/api/metrics", api.metrics),
        Route("/api/compare", api.compare),
        Route("/api/chat", api.answer, methods=["POST"]),
        Route("/files/{path:path}", api.file),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    handlers = {Refused: _refused, NotFound: _not_found, VelotuneError: _user_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    return Guard(app, token, loopback)


class Guard:
    """ASGI middleware: the token check, and the Host check on loopback."""

    def __init__(self, app: Any, token: str | None, loopback: bool) -> None:
        self.app, self.token, self.loopback = app, token, loopback

    async def __call__(self, scope: dict, receive: Callable, send: Callable[[dict], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if self.loopback and _hostname(headers.get("host", "")) not in LOOPBACK_NAMES:
            await PlainTextResponse("refused: this dashboard answers requests for 127.0.0.1 only", 403)(
                scope, receive, send
            )
            return
        if self.token is None:
            await self.app(scope, receive, send)
            return
        given = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token", [""])[0]
        cookie = SimpleCookie(headers.get("cookie", ""))
        held = cookie[COOKIE].value if COOKIE in cookie else ""
        if _same(given, self.token):
            await self.app(scope, receive, _with_cookie(send, self.token))
        elif _same(held, self.token):
            await self.app(scope, receive, send)
        else:
            text = "refused: open the address `velotune dashboard` printed (it carries the token)"
            await PlainTextResponse(text, 403)(scope, receive, send)


def _same(given: str, token: str) -> bool:
    return secrets.compare_digest(given.encode("utf-8", "replace"), token.encode())


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host[1:].split("]")[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _with_cookie(send: Callable[[dict], Awaitable[None]], token: str) -> Callable[[dict], Awaitable[None]]:
    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start":
            value = f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"
            message = message | {"headers": [*message.get("headers", []), (b"set-cookie", value.encode())]}
        await send(message)

    return wrapped
