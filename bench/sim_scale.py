"""metersim at scale: build time, peak memory, answers/s and CPU per answer for 1k, 10k and 100k meters.

    .venv/bin/python bench/sim_scale.py                          # 1k, 10k, 100k meters, 10 s of reads each
    .venv/bin/python bench/sim_scale.py --sizes 1000 --duration 3   # CI smoke
    .venv/bin/python bench/sim_scale.py --json

For each size a fresh *server* process builds the fleet from a fleet spec
(buses of `--per-bus` meters, `baud = 0`: no wire emulation, each bus behind
its own TCP server on 127.0.0.1, the same code path as `metersim serve`), and
a separate *client* process opens one connection per bus and keeps exactly one
request in flight per bus (a bus answers one request at a time), alternating
a forward_active_energy read (00010000) and a block read (0001FF00) over the
bus's meters round robin. The server measures its own CPU time over the read
window, so "µs CPU per answer" is the simulator's cost alone; peak RSS is the
server's VmHWM (whole life: build, listening, answering).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

READS = (0x00010000, 0x0001FF00)


def peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# --- server ----------------------------------------------------------------------------------------
async def server(size: int, per_bus: int) -> None:
    from simulators.fleet import build, parse  # noqa: PLC0415 - the parent process does not need them
    from simulators.serve import Running  # noqa: PLC0415

    started = time.perf_counter()
    spec = parse({"buses": [{"name": "b", "tcp": "127.0.0.1:0", "baud": 0, "meters": per_bus,
                             "repeat": max(1, size // per_bus)}]})
    fleet = build(spec)
    built = time.perf_counter() - started
    rss_built = peak_rss_mb()
    running = Running(fleet)
    await running.start(io.StringIO())
    buses = [{"port": e.port, "addresses": list(b.meters)}  # type: ignore[attr-defined]
             for b, e in zip(fleet.buses, running.exposures, strict=True)]
    print(json.dumps({"build_s": built, "rss_built_mb": rss_built, "buses": buses}), flush=True)

    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def answered() -> int:
        return sum(m.truth["answered"] for b in fleet.buses for m in b.meters.values())

    await reader.readline()  # "go"
    cpu0, answered0 = time.process_time(), answered()
    await reader.readline()  # "stop"
    cpu = time.process_time() - cpu0
    count = answered() - answered0
    await running.close()
    print(json.dumps({"cpu_s": cpu, "answered": count, "peak_rss_mb": peak_rss_mb()}), flush=True)


# --- client ----------------------------------------------------------------------------------------
class BusClient(asyncio.Protocol):
    """One connection to one bus: one request in flight; counts complete replies."""

    def __init__(self, requests: list[bytes]) -> None:
        self.requests = requests
        self.next = 0
        self.buf = bytearray()
        self.replies = 0
        self.running = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self) -> None:
        assert self.transport is not None
        self.transport.write(self.requests[self.next])
        self.next = (self.next + 1) % len(self.requests)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        start = self.buf.find(0x68)
        if start < 0 or len(self.buf) < start + 10 or len(self.buf) < start + 12 + self.buf[start + 9]:
            return
        self.buf.clear()
        self.replies += 1
        if self.running:
            self.send()


async def client(config: dict[str, object], duration: float) -> None:
    from protocols.dlt645 import read_request  # noqa: PLC0415

    loop = asyncio.get_running_loop()
    clients = []
    for bus in config["buses"]:  # type: ignore[attr-defined]
        requests = [read_request(a, READS[i % 2]) for i, a in enumerate(bus["addresses"])]
        requests += [read_request(a, READS[(i + 1) % 2]) for i, a in enumerate(bus["addresses"])]
        _, c = await loop.create_connection(lambda r=requests: BusClient(r), "127.0.0.1", bus["port"])
        clients.append(c)
    print("connected", flush=True)
    await asyncio.sleep(0.2)
    base = sum(c.replies for c in clients)
    started = time.perf_counter()
    for c in clients:
        c.running = True
        c.send()
    await asyncio.sleep(duration)
    for c in clients:
        c.running = False
    elapsed = time.perf_counter() - started
    count = sum(c.replies for c in clients) - base
    print(json.dumps({"replies": count, "elapsed_s": elapsed}), flush=True)
    await asyncio.sleep(0.2)  # let the last replies in flight arrive
    for c in clients:
        assert c.transport is not None
        c.transport.close()


# --- orchestration ----------------------------------------------------------------------------------
async def run_size(size: int, per_bus: int, duration: float) -> dict[str, float]:
    me = [sys.executable, __file__]
    srv = await asyncio.create_subprocess_exec(*me, "--serve", str(size), "--per-bus", str(per_bus),
                                               stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                               limit=1 << 26)
    assert srv.stdin is not None and srv.stdout is not None
    setup = json.loads(await srv.stdout.readline())
    cli = await asyncio.create_subprocess_exec(*me, "--drive", str(duration), stdin=asyncio.subprocess.PIPE,
                                               stdout=asyncio.subprocess.PIPE)
    assert cli.stdin is not None and cli.stdout is not None
    cli.stdin.write(json.dumps({"buses": setup["buses"]}).encode() + b"\n")
    await cli.stdin.drain()
    cli.stdin.close()
    assert (await cli.stdout.readline()).strip() == b"connected"
    srv.stdin.write(b"go\n")
    await srv.stdin.drain()
    result = json.loads(await cli.stdout.readline())
    srv.stdin.write(b"stop\n")
    await srv.stdin.drain()
    final = json.loads(await srv.stdout.readline())
    await cli.wait()
    await srv.wait()
    return {"meters": len(setup["buses"]) * per_bus, "buses": len(setup["buses"]), "build_s": setup["build_s"],
            "rss_built_mb": setup["rss_built_mb"], "peak_rss_mb": final["peak_rss_mb"],
            "answers_per_s": result["replies"] / result["elapsed_s"],
            "cpu_us_per_answer": final["cpu_s"] / max(final["answered"], 1) * 1e6,
            "server_cpu_share": final["cpu_s"] / result["elapsed_s"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--per-bus", type=int, default=100)
    p.add_argument("--duration", type=float, default=10.0, help="seconds of reads per size")
    p.add_argument("--json", action="store_true")
    p.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    p.add_argument("--drive", type=float, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.serve:
        asyncio.run(server(a.serve, a.per_bus))
        return 0
    if a.drive:
        asyncio.run(client(json.loads(sys.stdin.readline()), a.drive))
        return 0
    results = [asyncio.run(run_size(int(s), a.per_bus, a.duration)) for s in a.sizes.split(",")]
    if a.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"metersim scale, {a.duration:g} s of reads per size, {a.per_bus} meters per bus, baud 0, "
          f"{os.cpu_count()} CPUs; client in a separate process")
    print(f"{'meters':>8} {'buses':>6} {'build s':>8} {'RSS built MB':>13} {'peak RSS MB':>12} "
          f"{'answers/s':>10} {'µs CPU/answer':>14} {'server CPU':>11}")
    for r in results:
        print(f"{r['meters']:>8} {r['buses']:>6} {r['build_s']:>8.2f} {r['rss_built_mb']:>13.0f} "
              f"{r['peak_rss_mb']:>12.0f} {r['answers_per_s']:>10.0f} {r['cpu_us_per_answer']:>14.1f} "
              f"{r['server_cpu_share']:>10.0%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
