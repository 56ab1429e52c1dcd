"""The daemon's one HTTP server: `/metrics`, `/healthz`, `/api/v1/status`, and routes others add.

`/metrics` and `/healthz` are open; everything under `/api/` needs `Authorization: Bearer <token>`
when a token is configured. Binds 127.0.0.1:8645 by default. Every error is a 4xx/5xx with
`{"error": "..."}`. Routes are added with `add_routes()` before `start()`; handlers may raise
`ApiError(status, message)` and return `reply(data)`.

`/healthz` is 200 when the event loop is responsive (a heartbeat task measures its lag), the
journal is alive and at least one link is up; 503 otherwise, with the detail of each check.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from gateway.metrics import Metrics
from gateway.stats import CollectionStats

log = logging.getLogger("meterd.api")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Section = Callable[[], object]


def split_host_port(text: str) -> tuple[str, int]:
    """`127.0.0.1:8645`, `[::1]:8645`, `0.0.0.0:0` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"listen must be HOST:PORT (e.g. 127.0.0.1:8645), got {text!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


class ApiConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    listen: str = "127.0.0.1:8645"
    token: str | None = None
    token_file: Path | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        split_host_port(v)
        return v

    @model_validator(mode="after")
    def _one_token(self) -> ApiConfig:
        if self.token is not None and self.token_file is not None:
            raise ValueError("set api.token or api.token_file, not both")
        if self.token is not None and not self.token.strip():
            raise ValueError("api.token is empty")
        return self

    def resolved_token(self) -> str | None:
        """The token, reading `token_file` if set (at startup, before the loop serves anything)."""
        if self.token_file is None:
            return self.token
        try:
            token = self.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ValueError(f"api.token_file {self.token_file}: {exc.strerror or exc}") from None
        if not token:
            raise ValueError(f"api.token_file {self.token_file} is empty")
        return token


class ApiError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers or {}


def reply(data: object, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response(data, status=status, headers=headers, dumps=lambda d: json.dumps(d, default=str))


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        return reply({"error": str(exc)}, exc.status, exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        keep = {k: v for k, v in exc.headers.items() if k.lower() in {"allow", "www-authenticate", "retry-after"}}
        return reply({"error": f"{request.method} {request.path}: {exc.reason}"}, exc.status, keep)
    except Exception as exc:  # a handler bug: say so, keep serving
        log.exception("%s %s failed", request.method, request.path)
        return reply({"error": f"internal error: {type(exc).__name__}"}, 500)


class ApiServer:
    def __init__(self, config: ApiConfig, stats: CollectionStats, metrics: Metrics | None = None, *,
                 journal_ok: Callable[[], bool], links_up: Callable[[], int],
                 extra: Mapping[str, Section] | None = None,
                 max_loop_lag: float = 2.0, heartbeat: float = 0.5) -> None:
        """`metrics`: pass one to register callbacks on it first, or use `server.metrics` (made here).
        `extra`: status sections, `name -> callable` returning JSON-able data (or an awaitable)."""
        self.config, self.stats = config, stats
        self.metrics = metrics if metrics is not None else Metrics(stats)
        self.host, self.port = split_host_port(config.listen)
        self._token = config.resolved_token()
        self.journal_ok, self.links_up = journal_ok, links_up
        self.sections: dict[str, Section] = {}
        for name, fn in (extra or {}).items():
            self.add_section(name, fn)
        self.max_loop_lag, self.heartbeat = max_loop_lag, heartbeat
        self.loop_lag = 0.0
        self._last_beat: float | None = None
        self._beat_task: asyncio.Task[None] | None = None
        self._runner: web.AppRunner | None = None
        self.app = web.Application(middlewares=[errors, self._auth])
        self.app.router.add_get("/metrics", self._metrics)
        self.app.router.add_get("/healthz", self._healthz)
        self.app.router.add_get("/api/v1/status", self._status)

    # --- extension points -------------------------------------------------------------------------
    def add_routes(self, routes: Iterable[web.AbstractRouteDef]) -> None:
        """Add routes (e.g. `web.post("/api/v1/read", handler)`); before `start()` only."""
        if self._runner is not None:
            raise RuntimeError("add routes before ApiServer.start()")
        self.app.router.add_routes(routes)

    def add_section(self, name: str, fn: Section) -> None:
        """`/api/v1/status` gets `name: fn()` (JSON-able; may be awaitable), e.g. "sinks", "journal"."""
        if name in self.stats.snapshot(top=0) or name == "health":
            raise ValueError(f"status section {name!r} would hide a built-in one")
        self.sections[name] = fn

    def set_token(self, token: str | None) -> None:
        """A reload changed the token."""
        self._token = token

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # --- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]
        self._beat_task = asyncio.create_task(self._beat(), name="api-heartbeat")
        if self._token is None and not _is_loopback(self.host):
            log.warning("API on %s without a token: anyone who can reach it can use /api/", self.url)
        log.info("API listening on %s", self.url)

    async def stop(self) -> None:
        if self._beat_task is not None:
            self._beat_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat_task
            self._beat_task = None
        if self._runner is not None:
            await self._runner.cleanup()

    async def _beat(self) -> None:
        loop = asyncio.get_running_loop()
        self._last_beat = loop.time()
        while True:
            before = loop.time()
            await asyncio.sleep(self.heartbeat)
            now = loop.time()
            self.loop_lag = max(0.0, now - before - self.heartbeat)
            self._last_beat = now

    # --- health -----------------------------------------------------------------------------------
    def health(self) -> tuple[bool, dict[str, Any]]:
        checks: dict[str, dict[str, Any]] = {"loop": self._loop_check()}
        checks["journal"] = _check(lambda: {"ok": bool(self.journal_ok())})
        checks["links"] = _check(lambda: {"ok": (up := int(self.links_up())) > 0, "up": up})
        ok = all(c["ok"] for c in checks.values())
        return ok, {"status": "ok" if ok else "failing", "checks": checks}

    def _loop_check(self) -> dict[str, Any]:
        if self._last_beat is None:
            return {"ok": False, "error": "heartbeat not running"}
        age = asyncio.get_running_loop().time() - self._last_beat
        ok = self.loop_lag <= self.max_loop_lag and age <= self.heartbeat + self.max_loop_lag
        return {"ok": ok, "lag": round(self.loop_lag, 4), "last_beat_age": round(age, 3), "max_lag": self.max_loop_lag}

    # --- handlers ---------------------------------------------------------------------------------
    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._token is not None and request.path.startswith("/api/"):
            scheme, _, given = request.headers.get("Authorization", "").partition(" ")
            challenge = {"WWW-Authenticate": 'Bearer realm="meterd"'}
            if scheme.lower() != "bearer" or not given.strip():
                raise ApiError(401, "this API needs a token: Authorization: Bearer <token>", challenge)
            if not hmac.compare_digest(given.strip().encode(), self._token.encode()):
                raise ApiError(401, "wrong token", challenge)
        return await handler(request)

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(), headers={"Content-Type": self.metrics.content_type})

    async def _healthz(self, request: web.Request) -> web.Response:
        ok, detail = self.health()
        return reply(detail, 200 if ok else 503)

    async def _status(self, request: web.Request) -> web.Response:
        data = self.stats.snapshot()
        data["health"] = self.health()[1]
        for name, fn in self.sections.items():
            try:
                value = fn()
                data[name] = await value if inspect.isawaitable(value) else value
            except Exception as exc:  # one broken section must not hide the rest
                log.warning("status section %s failed: %r", name, exc)
                data[name] = {"error": f"{type(exc).__name__}: {exc}"}
        return reply(data)


def _check(fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return fn()
    except Exception as exc:  # a broken probe is a failed check, with the reason
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
