"""Process plumbing for the integration-test servers (see tests/services.py).

``Server`` runs one server binary in its own temp dir with captured output, waits until it
answers (with a deadline, raising with the log tail), and stops it with SIGTERM then SIGKILL.
It can be stopped and started again with the same port and data. Helpers: free loopback
ports, binary lookup that names scripts/test, and a loopback-only HTTP client.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pytest

LOOPBACK = "127.0.0.1"
READY_TIMEOUT = 30.0  # seconds a server may take to answer after start
STOP_TIMEOUT = 15.0  # seconds between SIGTERM and SIGKILL
POLL_INTERVAL = 0.05

_LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
# Never route test traffic through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    return free_tcp_ports(1)[0]


def free_tcp_ports(count: int) -> list[int]:
    """``count`` distinct free ports (all sockets are held open until all are chosen)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((LOOPBACK, 0))
        return [sock.getsockname()[1] for sock in socks]


def find_binary(name: str) -> str:
    """Path of a server binary, or fail the test saying how to install it."""
    path = shutil.which(name) or next(
        (p for d in ("/usr/sbin", "/usr/bin", "/sbin") if os.access(p := f"{d}/{name}", os.X_OK)),
        None,
    )
    if path is None:
        pytest.fail(
            f"{name} is not installed: run the tests with scripts/test, which installs the "
            "Debian packages mosquitto, influxdb and victoria-metrics",
            pytrace=False,
        )
    return path


def http_request(
    method: str, url: str, body: bytes | None = None, timeout: float = 10.0
) -> tuple[int, bytes]:
    """One HTTP request to a loopback server; returns (status, body) for any status."""
    if urllib.parse.urlsplit(url).hostname not in _LOOPBACK_NAMES:
        raise ValueError(f"test HTTP traffic must stay on loopback, not {url}")
    request = urllib.request.Request(url, data=body, method=method)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} not readable)"
    return "\n".join(text.splitlines()[-lines:])


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if pytest dies, the server gets SIGTERM.
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(eq=False)
class Server:
    """A server process owned by the tests; subclasses say how to run and probe it."""

    binary: str
    workdir: Path
    port: int
    host: str = LOOPBACK
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    name: ClassVar[str] = "server"

    def command(self) -> list[str]:
        raise NotImplementedError

    def is_ready(self) -> bool:
        raise NotImplementedError

    def prepare(self) -> None:
        """Write config files before each start."""

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    @property
    def output_path(self) -> Path:
        """The process' captured stdout+stderr (appended across restarts)."""
        return self.workdir / f"{self.name}.out"

    def log_paths(self) -> list[Path]:
        return [self.output_path]

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(f"--- {p.name} ---\n{_tail(p, lines)}" for p in self.log_paths())

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Start the server (no-op if running) and wait until it answers on its port."""
        if self.running:
            return
        self.prepare()
        with self.output_path.open("ab") as out:
            out.write(f"--- starting {self.command()} ---\n".encode())
            out.flush()
            in_main = threading.current_thread() is threading.main_thread()
            self._proc = subprocess.Popen(
                self.command(),
                cwd=self.workdir,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                # PDEATHSIG fires when the forking *thread* exits: only from the main thread.
                preexec_fn=_die_with_parent if in_main else None,  # noqa: PLW1509
            )
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            code = self._proc.poll()
            if code is not None or time.monotonic() > deadline:
                self.stop()
                why = f"exited with code {code}" if code is not None else f"not ready in {timeout}s"
                raise RuntimeError(
                    f"{self.name} on {self.host}:{self.port} {why}\n{self.log_tail()}"
                )
            time.sleep(POLL_INTERVAL)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop the server (SIGTERM, then SIGKILL after ``timeout``); no-op if stopped."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    @contextlib.contextmanager
    def stopped(self) -> Iterator[None]:
        """Stop the server for the ``with`` block and start it again afterwards, always."""
        self.stop()
        try:
            yield
        finally:
            self.start()
