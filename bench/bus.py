"""One emulated 2400-Bd RS-485 bus of 32 meters: how close does the gateway's bus get to the wire?

    .venv/bin/python bench/bus.py                       # 4 runs of 30 s: energy / block x preamble 4 / 0
    .venv/bin/python bench/bus.py --duration 5          # quick look
    .venv/bin/python bench/bus.py --gap 0 --delay 50,50 # no guard time, fixed 50 ms reply delay
    .venv/bin/python bench/bus.py --json

metersim runs in a subprocess (`metersim serve --fleet` with a temp fleet file: one bus, 32 meters,
2400 Bd, reply delay 20-80 ms, a TCP exposure on 127.0.0.1). This process runs the real collection
path: a `TcpLink`, a `Bus` (default timing: 20 ms gap, 1 retry) and the `Dlt645Reader`, with 32
tasks each reading its meter over and over (the bus queue is never empty, like during a round).

For each run: achieved reads/s (successful meter reads per wall second) against the wire ceiling,
the best one half-duplex line can do: per transaction (request bytes incl. FE preamble + reply bytes
incl. FE preamble) x 11 bits / baud + the mean reply delay. Byte counts are what the link really
sent and received per transaction ("req B", "rep B"); CPU is this process' share of one core. The
request preamble is the gateway's `preamble`; the meters'
reply preamble is metersim's (`--reply-preamble`, default 4 like most meters). The gap between
transactions is the gateway's own guard time, so it counts against the ratio (target >= 0.9).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.archive import MeterConfig
from gateway.bus import Bus, Timing
from gateway.links import TcpLink
from gateway.reader import Dlt645Reader
from protocols.dlt645 import find

METERS = 32
BAUD = 2400
BITS = 11  # 8E1


def fleet_text(meters: int, baud: int, delay: tuple[float, float], reply_preamble: int) -> str:
    return f"""[[buses]]
name = "bench"
tcp = "127.0.0.1:0"
baud = {baud}
reply_delay_ms = [{delay[0]}, {delay[1]}]
meters = {meters}
first_address = "000000000001"
preamble = {reply_preamble}
"""


async def start_metersim(fleet: Path) -> tuple[asyncio.subprocess.Process, list[int]]:
    """`metersim serve --fleet` in a subprocess; the TCP port of each bus, once it printed `ready`."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "simulators.cli", "serve", "--fleet", str(fleet),
                                                stdout=asyncio.subprocess.PIPE, limit=1 << 20,
                                                cwd=Path(__file__).resolve().parents[1])
    assert proc.stdout is not None
    ports = []
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode().strip()
        if not line:
            raise RuntimeError("metersim exited before it was ready")
        if " tcp " in line:
            ports.append(int(line.split()[2].rsplit(":", 1)[1]))
        if line == "ready":
            return proc, ports


async def one_run(port: int, item: str, preamble: int, gap: float, duration: float, meters: int) -> dict[str, Any]:
    link = TcpLink("bench", "127.0.0.1", port)
    timing = Timing(first_byte=1.0, inter_byte=0.1, gap=gap, retries=1, preamble=preamble)
    bus = Bus(link, timing)
    reader = Dlt645Reader("bench", ZoneInfo("Asia/Shanghai"), lambda m: timing)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(link.run(stop)), asyncio.create_task(bus.run(stop))]
    assert await link.wait_up(5)
    counts = {"ok": 0, "failed": 0}
    running = True

    async def poll(address: str) -> None:
        meter = MeterConfig(address=address, link="bench")
        while running:
            outcome = await reader.read(bus, meter, [item], plan="bench")
            counts["ok" if outcome.ok else "failed"] += 1

    addresses = [f"{n:012d}" for n in range(1, meters + 1)]
    pollers = [asyncio.create_task(poll(a)) for a in addresses]
    await asyncio.sleep(2.0)  # warm up: the queue is full, the line busy
    ok0, failed0, out0, in0, req0 = (counts["ok"], counts["failed"], link.stats["bytes_out"], link.stats["bytes_in"],
                                     bus.stats["requests"])
    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.sleep(duration)
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    ok, failed = counts["ok"] - ok0, counts["failed"] - failed0
    requests = bus.stats["requests"] - req0
    bytes_out, bytes_in = link.stats["bytes_out"] - out0, link.stats["bytes_in"] - in0
    running = False
    await asyncio.wait(pollers, timeout=5)
    stop.set()
    await asyncio.gather(*tasks)
    return {"item": item, "preamble": preamble, "gap_s": gap, "reads": ok, "failed": failed, "elapsed_s": elapsed,
            "requests": requests, "request_bytes": bytes_out / max(requests, 1),
            "reply_bytes": bytes_in / max(requests, 1), "cpu_s": cpu, "reads_per_s": ok / elapsed}


def ceiling(run: dict[str, Any], baud: int, delay_mean: float) -> float:
    per_txn = (run["request_bytes"] + run["reply_bytes"]) * BITS / baud + delay_mean
    txns_per_read = run["requests"] / max(run["reads"] + run["failed"], 1)
    return 1.0 / (per_txn * txns_per_read)


async def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    delay = tuple(float(x) for x in args.delay.split(","))
    assert len(delay) == 2
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        fleet = Path(tmp) / "fleet.toml"
        fleet.write_text(fleet_text(args.meters, args.baud, (delay[0], delay[1]), args.reply_preamble))
        proc, (port,) = await start_metersim(fleet)
        try:
            for item in args.items.split(","):
                find(item)
                for preamble in (4, 0):
                    run = await one_run(port, item, preamble, args.gap, args.duration, args.meters)
                    run["ceiling_per_s"] = ceiling(run, args.baud, (delay[0] + delay[1]) / 2000)
                    run["ratio"] = run["reads_per_s"] / run["ceiling_per_s"]
                    results.append(run)
                    if not args.json:
                        show(run)
        finally:
            proc.terminate()
            await proc.wait()
    return results


def show(r: dict[str, Any]) -> None:
    print(f"{r['item']:<28} {r['preamble']:>4} {r['request_bytes']:>6.1f} {r['reply_bytes']:>6.1f} "
          f"{r['reads']:>6} {r['failed']:>5} {r['reads_per_s']:>8.2f} {r['ceiling_per_s']:>8.2f} {r['ratio']:>6.3f} "
          f"{r['cpu_s'] / r['elapsed_s']:>7.1%}", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=30.0, help="seconds measured per run (after 2 s warm-up)")
    p.add_argument("--items", default="forward_active_energy,forward_active_energy_block")
    p.add_argument("--meters", type=int, default=METERS)
    p.add_argument("--baud", type=int, default=BAUD)
    p.add_argument("--delay", default="20,80", help="metersim reply delay MIN,MAX in ms (default 20,80: mean 50)")
    p.add_argument("--gap", type=float, default=Timing().gap, help="the gateway's gap between frames, s")
    p.add_argument("--reply-preamble", type=int, default=4, help="FE bytes the meters put before replies")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if not args.json:
        print(f"bus bench: {args.meters} meters, {args.baud} Bd 8E1, reply delay {args.delay} ms, gateway gap "
              f"{args.gap * 1000:g} ms, reply preamble {args.reply_preamble}, {args.duration:g} s per run")
        print(f"{'item':<28} {'pre':>4} {'req B':>6} {'rep B':>6} {'reads':>6} {'fail':>5} {'reads/s':>8} "
              f"{'ceiling':>8} {'ratio':>6} {'CPU':>7}")
    results = asyncio.run(bench(args))
    if not args.json:
        print(f"load average now {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)")
    if args.json:
        print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
