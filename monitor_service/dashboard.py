"""The monitor's live dashboard: one read-only HTTP page over the records and events the CLI reads.

Off unless a port is configured (``--dashboard-port`` / SLMCL_DASHBOARD_PORT). A stdlib
``ThreadingHTTPServer`` on a daemon thread beside the gRPC server, no new dependency: the page is one
HTML file and one vanilla-JS file served from ``monitor_service/static`` (no build, no CDN, nothing from the
network), which draws the figures as inline SVG from ``slmcl.report.live``'s JSON.

Polling, not server-sent events: an SSE stream holds one of this server's threads for as long as a tab is
open (the very problem the gRPC side moved to asyncio for), needs reconnect logic across monitor restarts
and ssh tunnels, and buys nothing at this data rate (a stage takes minutes). The page asks every 2 s; an
experiment's figures are rebuilt only when its set of committed stage records changes, and otherwise the
answer is a 304 (an ETag over that set and the state).

It shows experiment data without gRPC's interceptor, so it follows the same rule (service_common.auth):
with tokens configured every request needs one (``Authorization: Bearer`` or the HttpOnly cookie that
``/?token=...`` sets); with none, it serves only on a loopback address unless SLMCL_AUTH=off.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import socket
import threading
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from monitor_service.server import InvalidRequest, check_experiment_id
from service_common import keys
from service_common.auth import (
    AUTH_ENV,
    TOKENS_ENV,
    TOKENS_FILE_ENV,
    AuthConfigError,
    TokenChecker,
    auth_disabled,
    is_local_address,
    server_tokens,
)
from service_common.redis_conn import text_fields
from slmcl.errors import NotFoundError
from slmcl.protocol import layout
from slmcl.protocol.records import StageRecord
from slmcl.report import live

log = logging.getLogger(__name__)

PORT_ENV = "SLMCL_DASHBOARD_PORT"
HOST_ENV = "SLMCL_DASHBOARD_HOST"
DEFAULT_HOST = "127.0.0.1"
STATIC_DIR = Path(__file__).with_name("static")
STATIC_FILES = {"/": ("index.html", "text/html; charset=utf-8"),
                "/static/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
                "/static/dashboard.css": ("dashboard.css", "text/css; charset=utf-8")}
COOKIE = "slmcl_dashboard"
LIST_LIMIT = 50  # the newest experiments listed (each costs a few Redis and store round trips per poll)
PROGRESS_EVENTS = 2000  # the newest events read for live progress: enough for every run's latest state
ACTIVE = ("queued", "running")
CACHED = 16  # experiments whose figures payload is kept between polls
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_DETAIL = re.compile(r"/api/experiments/([^/]*)")


class Source(Protocol):
    """What the dashboard reads: the monitor's Control through ``ControlSource``, a stand-in in unit tests."""

    def list_ids(self) -> list[str]: ...

    def experiment(self, exp_id: str) -> dict[str, Any]: ...  # NotFoundError for an unknown id

    def stage_keys(self, exp_id: str) -> list[str]: ...

    def records(self, exp_id: str) -> list[StageRecord]: ...

    def spec(self, exp_id: str) -> dict[str, Any]: ...

    def events(self, exp_id: str, count: int) -> list[dict[str, Any]]: ...  # the newest ``count``, oldest first


class ControlSource:
    """The same records and events ``slmcl results`` and ``slmcl watch`` read, through Control's public parts."""

    def __init__(self, control: Any) -> None:  # monitor_service.control.Control (not imported: no rq needed here)
        self.control = control

    def list_ids(self) -> list[str]:
        ids: list[str] = self.control.list_ids()
        return ids

    def experiment(self, exp_id: str) -> dict[str, Any]:
        info: dict[str, Any] = self.control.experiment(exp_id)
        return info

    def stage_keys(self, exp_id: str) -> list[str]:
        store = self.control.tree(exp_id).store
        return sorted(k for k in store.list_keys(layout.runs_prefix()) if layout.is_stage_key(k))

    def records(self, exp_id: str) -> list[StageRecord]:
        recs: list[StageRecord] = self.control.tree(exp_id).records()
        return recs

    def spec(self, exp_id: str) -> dict[str, Any]:
        return self.control.tree(exp_id).read_spec_dict() or {}

    def events(self, exp_id: str, count: int) -> list[dict[str, Any]]:
        raw = self.control.redis.xrevrange(keys.events_stream(exp_id), count=count)
        out = []
        for _eid, fields in reversed(raw or []):
            f = text_fields(fields)
            try:
                data = json.loads(f.get("data_json") or "{}")
            except ValueError:
                data = {}
            out.append({"kind": f.get("kind", ""), "run_id": f.get("run_id", ""), "step": f.get("step", "0"),
                        "task": f.get("task", ""), "data": data})
        return out


def check_bind(host: str, env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """The tokens requests must carry (none: open); refuses an open dashboard off loopback, like ``add_port``."""
    tokens = server_tokens(env)
    if not tokens and not is_local_address(f"{host}:0") and not auth_disabled(env):  # host:port, as gRPC's
        raise AuthConfigError(
            f"refusing to serve the dashboard on {host} without authentication: set {TOKENS_ENV} (or "
            f"{TOKENS_FILE_ENV}), bind a loopback address ({HOST_ENV}=127.0.0.1), or set {AUTH_ENV}=off on a "
            "trusted network")
    return tokens


class Dashboard:
    """The answers, apart from HTTP: JSON-able objects, or NotFoundError (404) and InvalidRequest (400)."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self._cache: dict[str, tuple[str, dict[str, Any]]] = {}  # id -> (etag, figures payload)
        self._lock = threading.Lock()

    def experiments(self) -> list[dict[str, Any]]:
        out = []
        for exp_id in list(reversed(self.source.list_ids()))[:LIST_LIMIT]:  # newest first
            try:
                info = self.source.experiment(exp_id)
            except NotFoundError:  # deleted between the listing and now
                continue
            runs = info.get("runs", [])
            item = {"id": exp_id, "name": info.get("name", ""), "state": info.get("state", ""),
                    "error": info.get("error", ""), "created_at": info.get("created_at"),
                    "updated_at": info.get("updated_at"), "model": info.get("model", ""), "runs": runs,
                    "stages_total": sum(r.get("stages_total", 0) for r in runs),
                    "stages_done": sum(r.get("stages_evaluated", 0) for r in runs), "progress": {}}
            if item["state"] in ACTIVE:
                item["progress"] = live.progress(self.source.events(exp_id, PROGRESS_EVENTS))
            out.append(item)
        return out

    def detail(self, exp_id: str) -> tuple[str, dict[str, Any]]:
        """(etag, payload): the figures are rebuilt only when the committed stage records changed."""
        info = self.source.experiment(check_experiment_id(exp_id))
        stage_keys = self.source.stage_keys(exp_id)
        etag = hashlib.sha256("\n".join([info.get("state", ""), *stage_keys]).encode()).hexdigest()[:32]
        with self._lock:
            cached = self._cache.get(exp_id)
        if cached is None or cached[0] != etag:
            body = live.payload(self.source.records(exp_id), self.source.spec(exp_id))
            body["experiment"] = {k: info.get(k) for k in ("id", "name", "state", "error", "model", "created_at")}
            cached = (etag, body)
            with self._lock:
                self._cache.pop(exp_id, None)
                self._cache[exp_id] = cached  # the most recently rebuilt last; the oldest go beyond CACHED
                while len(self._cache) > CACHED:
                    self._cache.pop(next(iter(self._cache)))
        return cached


def _auth_error(checker: TokenChecker | None, header: str | None, cookie_token: str | None) -> str | None:
    """None when the request may go on: no tokens configured, or a valid one in the header or the cookie."""
    if checker is None:
        return None
    if header is None and cookie_token:
        header = f"Bearer {cookie_token}"
    return checker.check([("authorization", header)] if header is not None else [])


def make_handler(dashboard: Dashboard, tokens: Sequence[str]) -> type[BaseHTTPRequestHandler]:
    checker = TokenChecker(tokens) if tokens else None

    class Handler(BaseHTTPRequestHandler):
        server_version = "slmcl-dashboard"
        sys_version = ""

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._serve(head=False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._serve(head=True)

        def _refuse_method(self) -> None:
            self._send(HTTPStatus.METHOD_NOT_ALLOWED, b"read-only: GET and HEAD only\n", "text/plain; charset=utf-8",
                       extra={"Allow": "GET, HEAD"})

        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse_method  # noqa: N815

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            # The path without its query: a ?token= must never reach a log.
            log.debug("%s %s %s", self.address_string(), self.command, urlsplit(self.path).path)

        def _cookie_token(self) -> str | None:
            try:
                morsel = SimpleCookie(self.headers.get("Cookie", "")).get(COOKIE)
            except CookieError:
                return None
            return morsel.value if morsel else None

        def _serve(self, head: bool) -> None:
            url = urlsplit(self.path)
            try:
                given = parse_qs(url.query).get("token", [])
                if given and url.path == "/":
                    self._login(given[0])
                    return
                why = _auth_error(checker, self.headers.get("Authorization"), self._cookie_token())
                if why is not None:
                    self._send(HTTPStatus.UNAUTHORIZED, f"{why}; open /?token=<token> once\n".encode(),
                               "text/plain; charset=utf-8", head, extra={"WWW-Authenticate": "Bearer"})
                    return
                self._route(url.path, head)
            except InvalidRequest as exc:
                self._json(HTTPStatus.BAD_REQUEST, {"error": str(exc)}, head)
            except NotFoundError as exc:
                self._json(HTTPStatus.NOT_FOUND, {"error": str(exc)}, head)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the browser went away
            except Exception:  # noqa: BLE001 - logged here; the client gets one line, never a traceback
                log.exception("dashboard: %s %s failed", self.command, url.path)
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR, {"error": "internal error (see the monitor's log)"}, head)

        def _login(self, token: str) -> None:
            why = _auth_error(checker, f"Bearer {token}", None)
            if why is not None:
                self._send(HTTPStatus.UNAUTHORIZED, f"{why}\n".encode(), "text/plain; charset=utf-8")
                return
            # The token leaves the address bar (and the history) at once; the cookie carries it from here on.
            cookie = f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
            self._send(HTTPStatus.SEE_OTHER, b"", "text/plain", extra={"Location": "/", "Set-Cookie": cookie})

        def _route(self, path: str, head: bool) -> None:
            if path in STATIC_FILES:
                name, ctype = STATIC_FILES[path]
                self._send(HTTPStatus.OK, (STATIC_DIR / name).read_bytes(), ctype, head)
            elif path == "/favicon.ico":  # browsers ask for it; a 404 would be a console error on every load
                self._send(HTTPStatus.NO_CONTENT, b"", "image/x-icon", True)
            elif path == "/api/experiments":
                self._json(HTTPStatus.OK, {"experiments": dashboard.experiments()}, head)
            elif m := _DETAIL.fullmatch(path):
                tag, body = dashboard.detail(m.group(1))
                etag = f'"{tag}"'
                if self.headers.get("If-None-Match") == etag:
                    self._send(HTTPStatus.NOT_MODIFIED, b"", "application/json", True, extra={"ETag": etag})
                    return
                self._json(HTTPStatus.OK, body, head, extra={"ETag": etag})
            else:
                raise NotFoundError(f"no such page: {path[:80]}")

        def _json(self, status: HTTPStatus, obj: Any, head: bool = False, extra: dict[str, str] | None = None) -> None:
            self._send(status, json.dumps(obj, allow_nan=False).encode(), "application/json", head, extra)

        def _send(self, status: HTTPStatus, body: bytes, ctype: str, head: bool = False,
                  extra: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for k, v in {**SECURITY_HEADERS, "Content-Type": ctype, **(extra or {})}.items():
                self.send_header(k, v)
            if status not in (HTTPStatus.NO_CONTENT, HTTPStatus.NOT_MODIFIED):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head:
                self.wfile.write(body)

    return Handler


class DashboardServer(ThreadingHTTPServer):
    daemon_threads = True  # a slow browser never holds the monitor's shutdown


class DashboardServer6(DashboardServer):
    address_family = socket.AF_INET6


def make_server(source: Source, host: str, port: int, env: Mapping[str, str] | None = None) -> DashboardServer:
    """Bound, not yet serving; ``server.server_address[1]`` is the port (0 picks a free one)."""
    tokens = check_bind(host, env)
    cls = DashboardServer6 if ":" in host else DashboardServer
    try:
        return cls((host, port), make_handler(Dashboard(source), tokens))
    except OSError as exc:
        raise AuthConfigError(f"dashboard: cannot bind {host}:{port}: {exc.strerror or exc}") from None


def start_dashboard(source: Source, host: str, port: int, env: Mapping[str, str] | None = None) -> DashboardServer:
    """Serve on a daemon thread; stop with ``server.shutdown()`` then ``server.server_close()``."""
    server = make_server(source, host, port, env)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="dashboard", daemon=True).start()
    log.info("dashboard on http://%s:%d/ (%s)", host, server.server_address[1],
             "token required" if check_bind(host, env) else "no token: loopback or SLMCL_AUTH=off")
    return server


__all__ = ["ControlSource", "Dashboard", "check_bind", "make_server", "start_dashboard"]
