"""SIGHUP on a running daemon: unchanged links keep their connection, new meters are collected,
a broken file changes nothing."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from simulators.bus import Bus, Wire
from simulators.meter import Meter
from simulators.tcp import serve_tcp

METERD = str(Path(sys.executable).with_name("meterd"))


def config(port: int, api: int, meters: int) -> str:
    text = f"""
[station]
name = "reload"
state_dir = "state"
[api]
listen = "127.0.0.1:{api}"
[[links]]
name = "bus1"
kind = "tcp"
host = "127.0.0.1"
port = {port}
[[plans]]
name = "p"
items = ["forward_active_energy"]
every = "2s"
"""
    for i in range(1, meters + 1):
        text += f'[[meters]]\naddress = "{i:012d}"\nlink = "bus1"\n'
    return text


def status(api: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{api}/api/v1/status", timeout=2) as response:
        return json.loads(response.read())


async def until(check, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = await asyncio.to_thread(check)
        except OSError:
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.2)


async def test_sighup_reload(tmp_path, free_port):
    now = time.time()
    bus = Bus("b", [Meter(f"{i:012d}", epoch=now - 70 * 86400, now=now) for i in (1, 2)],
              Wire(baud=0))
    exposure = await serve_tcp(bus, "127.0.0.1", 0)
    path = tmp_path / "meterd.toml"
    path.write_text(config(exposure.port, free_port, 1))
    log = (tmp_path / "meterd.log").open("w")
    daemon = subprocess.Popen([METERD, "run", "-c", str(path)], stdout=log, stderr=subprocess.STDOUT)
    try:
        first = await until(lambda: (s := status(free_port))["links"].get("bus1", {}).get("up") and s)
        since = first["links"]["bus1"]["since"]
        await until(lambda: status(free_port)["today"]["plans"].get("p", {}).get("collected", 0) >= 1)
        path.write_text(config(exposure.port, free_port, 2))
        os.kill(daemon.pid, signal.SIGHUP)
        await until(lambda: "000000000002" in {m.address for m in bus.meters.values() if m.truth["answered"]})
        after = status(free_port)
        assert after["links"]["bus1"]["since"] == since  # the link was not reconnected
        path.write_text("[station\n")
        os.kill(daemon.pid, signal.SIGHUP)
        await until(lambda: "reload refused" in (tmp_path / "meterd.log").read_text())
        answered = bus.meters["000000000002"].truth["answered"]
        await until(lambda: bus.meters["000000000002"].truth["answered"] > answered)  # still collecting
        assert daemon.poll() is None
    finally:
        daemon.send_signal(signal.SIGTERM)
        await asyncio.to_thread(daemon.wait, 15)
        log.close()
        await exposure.close()
        await bus.close()
    assert daemon.returncode == 0
