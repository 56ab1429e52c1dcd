"""Real servers for integration tests: Mosquitto, InfluxDB 1.x (influxd), VictoriaMetrics.

Loaded as a pytest plugin from tests/conftest.py. Each session-scoped fixture starts the
server on free 127.0.0.1 ports in its own temp dir, waits until it answers, yields a handle
and stops it at the end of the session. Handles can be stopped and started again on the same
port with the same data (``stop()``, ``start()``, ``restart()``, ``with handle.stopped():``),
so tests can exercise reconnects and durability. A test that stops a server must bring it
back (use ``stopped()``), since the handle is shared by the whole session.

The binaries come from Debian packages that ``scripts/test`` installs; a missing binary fails
the test and names that script. Everything here talks to loopback only.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import socket
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import pytest

from tests.server_process import (
    POLL_INTERVAL,
    Server,
    find_binary,
    free_tcp_port,
    free_tcp_ports,
    http_request,
)

__all__ = [
    "InfluxDB",
    "InfluxError",
    "Mosquitto",
    "Server",
    "VictoriaMetrics",
    "find_binary",
    "free_tcp_port",
    "free_tcp_ports",
    "http_request",
]

# MQTT 3.1.1 CONNECT (clean session, empty client id) and DISCONNECT packets.
_MQTT_CONNECT = bytes([0x10, 12, 0, 4, *b"MQTT", 4, 0x02, 0, 60, 0, 0])
_MQTT_DISCONNECT = bytes([0xE0, 0])


@dataclass(eq=False)
class Mosquitto(Server):
    name: ClassVar[str] = "mosquitto"

    @property
    def config_path(self) -> Path:
        return self.workdir / "mosquitto.conf"

    def log_paths(self) -> list[Path]:
        return [self.output_path, self.workdir / "mosquitto.log"]

    def prepare(self) -> None:
        lines = [
            f"listener {self.port} {self.host}",
            "allow_anonymous true",
            "persistence false",
            f"log_dest file {self.workdir / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "set_tcp_nodelay true",
            # As root mosquitto would switch to user 'mosquitto' and lose our temp dir.
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def command(self) -> list[str]:
        return [self.binary, "-c", str(self.config_path)]

    def is_ready(self) -> bool:
        """A real MQTT handshake: CONNECT must get a CONNACK with return code 0."""
        try:
            with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                sock.sendall(_MQTT_CONNECT)
                connack = sock.recv(4)
                sock.sendall(_MQTT_DISCONNECT)
        except OSError:
            return False
        return len(connack) == 4 and connack[0] == 0x20 and connack[3] == 0


class InfluxError(RuntimeError):
    pass


@dataclass(eq=False)
class InfluxDB(Server):
    """influxd 1.x with HTTP on ``port`` and its backup/restore RPC on ``rpc_port``."""

    rpc_port: int = 0
    name: ClassVar[str] = "influxd"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self.workdir / "influxdb.conf"

    def prepare(self) -> None:
        meta, data, wal = (self.workdir / d for d in ("meta", "data", "wal"))
        disabled = "".join(
            f"\n[[{s}]]\n  enabled = false\n" for s in ("graphite", "collectd", "opentsdb", "udp")
        )
        self.config_path.write_text(
            f"""reporting-disabled = true
bind-address = "{self.host}:{self.rpc_port}"
[meta]
  dir = "{meta}"
[data]
  dir = "{data}"
  wal-dir = "{wal}"
  query-log-enabled = false
[http]
  enabled = true
  bind-address = "{self.host}:{self.port}"
  auth-enabled = false
  log-enabled = true
  pprof-enabled = false
[monitor]
  store-enabled = false
[continuous_queries]
  enabled = false
[subscriber]
  enabled = false
[logging]
  suppress-logo = true
{disabled}"""
        )

    def command(self) -> list[str]:
        return [self.binary, "run", "-config", str(self.config_path)]

    def environment(self) -> dict[str, str]:
        # INFLUXDB_* variables override the config file: keep the server hermetic.
        return {k: v for k, v in os.environ.items() if not k.startswith("INFLUXDB_")}

    def is_ready(self) -> bool:
        try:
            return http_request("GET", f"{self.url}/ping", timeout=1.0)[0] == 204
        except (OSError, HTTPException):
            return False

    def query(self, q: str, db: str | None = None) -> dict[str, Any]:
        """Run InfluxQL via POST /query; raise InfluxError on an HTTP or statement error."""
        params = {"q": q, **({"db": db} if db else {})}
        status, body = http_request(
            "POST", f"{self.url}/query?{urllib.parse.urlencode(params)}", body=b""
        )
        if status != 200:
            raise InfluxError(f"{q!r}: HTTP {status}: {body[:500]!r}")
        result: dict[str, Any] = json.loads(body)
        errors = [r["error"] for r in result.get("results", []) if "error" in r]
        if errors:
            raise InfluxError(f"{q!r}: {errors}")
        return result

    def create_database(self, name: str) -> None:
        self.query(f'CREATE DATABASE "{name}"')

    def write(self, lines: str, db: str, precision: str = "s") -> None:
        """Write line protocol to /write; raise InfluxError unless it answers 204."""
        params = urllib.parse.urlencode({"db": db, "precision": precision})
        status, body = http_request("POST", f"{self.url}/write?{params}", lines.encode())
        if status != 204:
            raise InfluxError(f"write to {db}: HTTP {status}: {body[:500]!r}")


@dataclass(eq=False)
class VictoriaMetrics(Server):
    """Single-node VictoriaMetrics, tuned so that written samples are readable at once."""

    name: ClassVar[str] = "victoria-metrics"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [
            self.binary,
            f"-storageDataPath={self.workdir / 'data'}",
            f"-httpListenAddr={self.host}:{self.port}",
            "-search.latencyOffset=0s",  # default 30s hides the newest samples from queries
            "-search.disableCache",  # no cached (stale) query results between writes
            "-retentionPeriod=100y",  # tests write old timestamps (meter freeze times)
            "-memory.allowedBytes=256MiB",
            "-loggerOutput=stderr",
        ]

    def is_ready(self) -> bool:
        try:
            return http_request("GET", f"{self.url}/health", timeout=1.0) == (200, b"OK")
        except (OSError, HTTPException):
            return False

    def _get(self, path: str, **params: str) -> bytes:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        status, body = http_request("GET", url)
        if status != 200:
            raise RuntimeError(f"GET {url}: HTTP {status}: {body[:500]!r}")
        return body

    def flush(self) -> None:
        """Make samples written so far searchable (they are buffered for ~1 s otherwise)."""
        self._get("/internal/force_flush")

    def write(
        self, lines: str, path: str = "/api/v2/write", precision: str = "s", db: str = ""
    ) -> None:
        """Write InfluxDB line protocol (``/api/v2/write`` or ``/write``); expect 204.

        A ``db`` becomes a ``db`` label on every series (on either path)."""
        params = urllib.parse.urlencode({"precision": precision, **({"db": db} if db else {})})
        status, body = http_request("POST", f"{self.url}{path}?{params}", lines.encode())
        if status != 204:
            raise RuntimeError(f"write to {path}: HTTP {status}: {body[:500]!r}")

    def export(self, match: str) -> list[dict[str, Any]]:
        """Raw samples of the series matching a selector, e.g. ``{meter="1"}``."""
        self.flush()
        body = self._get("/api/v1/export", **{"match[]": match})
        return [json.loads(line) for line in body.splitlines() if line.strip()]

    def query(self, promql: str, wait: float = 3.0) -> dict[str, Any]:
        """Instant query via /api/v1/query; returns the decoded ``data`` object.

        VictoriaMetrics evaluates "now" on a clock that ticks once a second, so a sample
        written in the current second can be missing for up to ~1 s: this polls until the
        result is non-empty or ``wait`` seconds pass (``wait=0``: one request). For exact
        raw samples use ``export()``, which sees a write at once."""
        deadline = time.monotonic() + wait
        while True:
            self.flush()
            data: dict[str, Any] = json.loads(self._get("/api/v1/query", query=promql))["data"]
            if data["result"] or time.monotonic() >= deadline:
                return data
            time.sleep(POLL_INTERVAL * 2)


ServerT = TypeVar("ServerT", bound=Server)


def _serve(server: ServerT) -> Iterator[ServerT]:
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    workdir = tmp_path_factory.mktemp("mosquitto")
    server = Mosquitto(find_binary("mosquitto"), workdir, free_tcp_port())
    yield from _serve(server)


@pytest.fixture(scope="session")
def influxdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InfluxDB]:
    http_port, rpc_port = free_tcp_ports(2)
    workdir = tmp_path_factory.mktemp("influxdb")
    server = InfluxDB(find_binary("influxd"), workdir, http_port, rpc_port=rpc_port)
    yield from _serve(server)


@pytest.fixture(scope="session")
def victoriametrics(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetrics]:
    workdir = tmp_path_factory.mktemp("victoriametrics")
    server = VictoriaMetrics(find_binary("victoria-metrics"), workdir, free_tcp_port())
    yield from _serve(server)


@pytest.fixture
def free_port() -> int:
    return free_tcp_port()


@pytest.fixture
def unique_topic(request: pytest.FixtureRequest) -> str:
    """An MQTT topic no other test uses: ``meterd-test/<test name>/<random>``."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:80]
    return f"meterd-test/{safe}/{uuid.uuid4().hex[:12]}"
