"""sd_notify over a real unix datagram socket standing in for systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import sdnotify


@pytest.fixture
def systemd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound datagram socket, announced as $NOTIFY_SOCKET."""
    path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()


async def receive(sock: socket.socket, timeout: float = 1.0) -> str:
    data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), timeout)
    return data.decode()


async def test_ready_status_stopping(systemd: socket.socket) -> None:
    assert sdnotify.ready("links started")
    assert await receive(systemd) == "READY=1\nSTATUS=links started"
    assert sdnotify.status("collecting 120 meters")
    assert await receive(systemd) == "STATUS=collecting 120 meters"
    assert sdnotify.reloading()
    assert (await receive(systemd)).startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert sdnotify.stopping()
    assert await receive(systemd) == "STOPPING=1"


async def test_abstract_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"meterd-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready()
        assert await receive(sock) == "READY=1"


async def test_watchdog_pings_at_half_the_period_and_stops(systemd: socket.socket,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # 0.2 s -> ping every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == pytest.approx(0.1)
    stop = asyncio.Event()
    task = asyncio.create_task(sdnotify.watchdog(stop))
    times = []
    for _ in range(4):
        assert await receive(systemd) == "WATCHDOG=1"
        times.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(0.05 < g < 0.3 for g in gaps), gaps
    # a stuck loop sends nothing: that is what makes systemd restart us
    time.sleep(0.35)
    await receive(systemd)  # the ping that was due during the stall comes only after it
    late = time.monotonic()
    assert late - times[-1] >= 0.35
    stop.set()
    await asyncio.wait_for(task, 1.0)


async def test_no_ops_outside_systemd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    assert sdnotify.ready() is False
    assert sdnotify.watchdog_interval() is None
    await asyncio.wait_for(sdnotify.watchdog(asyncio.Event()), 0.5)  # returns at once
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.notify("READY=1") is False  # logged, never raised
    monkeypatch.setenv("WATCHDOG_PID", "1")  # the watchdog is for another process
    assert sdnotify.watchdog_interval() is None
