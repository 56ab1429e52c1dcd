"""10,000 meters over 100 TCP connections: meterd's collection path at scale, then into influxd 1.x.

    .venv/bin/python bench/scale.py                      # 30 s per phase, 100 buses x 100 meters
    .venv/bin/python bench/scale.py --duration 10 --no-influx --profile   # phase 1 only, with cProfile
    .venv/bin/python bench/scale.py --loop both          # asyncio, then uvloop (extra "fast"), each in a fresh process
    .venv/bin/python bench/scale.py --no-tune-gc         # CPython's default GC instead of the daemon's tune_gc()

By default it runs as `meterd run` does (gateway/runtime.py): uvloop when installed, and the GC
tuned once everything is set up (gc.freeze(), gen-0 threshold raised).

metersim runs in a subprocess (`metersim serve --fleet`, a temp fleet file like config/fleet-large.toml:
`repeat = 100` buses of 100 meters on consecutive 127.0.0.1 ports, `baud = 0`: instant answers). This
process runs meterd's collection path: 100 `TcpLink`s and `Bus`es (gap 0: with no wire a guard time
only adds sleeps), the `Dlt645Reader`, `Scheduler.run_round` with the daemon's `Observer` and a real
`Journal` (SQLite WAL, synchronous=FULL) in a temp dir; rounds of forward_active_energy_block +
voltage_a (2 transactions, 6 readings per meter) back to back.
Phase 1: CPU of this process (all threads) per successful read, i.e. per request answered, the unit
bench/bus.py counts reads/s in (target <= 100 µs), and per meter collected (its two reads and six
readings committed), with the kernel's share, peak RSS and readings/s into the journal.
Phase 2: the same plus an InfluxDB v1 sink (gzip, 5000 readings per request) into a real influxd in a
temp dir (as tests/services.py starts it), from the journal's start: points (lines) per second (target
>= 20,000). Phase 3: collection stopped, the sink drains alone.
metersim and influxd share the machine: see their CPU shares and the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import logging
import os
import pstats
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bus import start_metersim  # bench/bus.py

from gateway.archive import MeterConfig
from gateway.bus import Bus, Timing
from gateway.daemon import Observer
from gateway.journal import Journal, JournalConfig
from gateway.links import TcpLink
from gateway.logs import MeterLog
from gateway.model import Outcome
from gateway.plans import PlanConfig
from gateway.reader import Dlt645Reader
from gateway.runtime import GEN0_THRESHOLD, loop_factory, tune_gc
from gateway.scheduler import Scheduler
from gateway.sinks import InfluxSink, InfluxSinkConfig
from gateway.stats import CollectionStats

ROOT = Path(__file__).resolve().parents[1]
TZ = ZoneInfo("Asia/Shanghai")
ITEMS = ["forward_active_energy_block", "voltage_a"]
FIRST = 100_000_001  # "000100000001", as in config/fleet-large.toml


def vm(key: str, pid: int | str = "self") -> float:
    """VmHWM / VmRSS of a process in MB."""
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def cpu_of(pid: int | str) -> float:
    """utime + stime of a process (or "self/task/TID": a thread), s."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def thread_cpu() -> dict[str, float]:
    """CPU seconds per thread of this process, by thread name (the event loop is MainThread)."""
    out: dict[str, float] = {}
    for thread in threading.enumerate():
        with contextlib.suppress(OSError):
            name = thread.name.split("_")[0]
            out[name] = out.get(name, 0.0) + cpu_of(f"self/task/{thread.native_id}")
    return out


def consecutive_ports(count: int, base: int = 21000) -> int:
    """The first port of `count` consecutive free 127.0.0.1 ports."""
    while base + count < 65000:
        with contextlib.ExitStack() as stack:
            try:
                for port in range(base, base + count):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
                return base
            except OSError:
                base = port + 1
    raise RuntimeError(f"no {count} consecutive free ports")


class Counting(Observer):
    """The daemon's observer (statistics, per-meter log), counting what this bench reports."""

    def __init__(self) -> None:
        super().__init__(CollectionStats("bench", TZ, degraded_after=3), MeterLog())
        self.ok = self.failed = 0
        self.reasons: Counter[str] = Counter()

    def outcome(self, round_id: str, outcome: Outcome, *, plan: str, link: str, area: str) -> None:
        self.ok += outcome.ok
        self.failed += not outcome.ok
        if not outcome.ok:
            self.reasons[str(outcome.reason)] += 1
        super().outcome(round_id, outcome, plan=plan, link=link, area=area)


async def window(duration: float, obs: Counting, journal: Journal, sim_pid: int, buses: list[Bus],
                 boundary: asyncio.Event, extra: dict[str, Any]) -> dict[str, Any]:
    """Counters over whole rounds (from a round's end to a round's end), at least `duration` seconds.

    A meter's second transaction queues behind every first one on its bus, so reads end in bursts
    late in a round: a window cut mid-round would count transactions without their reads."""
    def transactions() -> int:
        return sum(b.stats["requests"] for b in buses)

    await boundary.wait()
    ok0, failed0, appended0, tx0 = obs.ok, obs.failed, journal.stats["appended"], transactions()
    sys0 = os.times().system
    cpu0, sim0, t0, threads0 = time.process_time(), cpu_of(sim_pid), time.perf_counter(), thread_cpu()
    sink0 = {k: v() for k, v in extra.items()}
    await asyncio.sleep(duration)
    await boundary.wait()
    elapsed = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    kernel = os.times().system - sys0
    ok, failed = obs.ok - ok0, obs.failed - failed0
    readings = journal.stats["appended"] - appended0
    tx = transactions() - tx0
    out = {"seconds": elapsed, "reads_ok": ok, "reads_failed": failed, "reads_per_s": ok / elapsed,
           "readings_per_s": readings / elapsed, "cpu_s": cpu, "cpu_share": cpu / elapsed,
           "cpu_us_per_read": cpu / max(ok, 1) * 1e6, "transactions": tx, "transactions_per_read": tx / max(ok, 1),
           "cpu_us_per_transaction": cpu / max(tx, 1) * 1e6,
           "kernel_share_of_cpu": kernel / max(cpu, 1e-9), "metersim_cpu_share": (cpu_of(sim_pid) - sim0) / elapsed,
           "rss_mb": vm("VmRSS"), "peak_rss_mb": vm("VmHWM"),
           "thread_cpu_us_per_read": {name: round((t - threads0.get(name, 0.0)) / max(ok, 1) * 1e6, 1)
                                      for name, t in thread_cpu().items()}}
    for key, fn in extra.items():
        out[key + "_per_s"] = (fn() - sink0[key]) / elapsed
    return out


async def bench(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    base = args.base_port or consecutive_ports(args.buses)
    fleet = tmp / "fleet.toml"
    fleet.write_text(f'[[buses]]\nname = "line-{{n}}"\nrepeat = {args.buses}\ntcp = "127.0.0.1:{base}"\nbaud = 0\n'
                     f'meters = {args.per_bus}\nfirst_address = "{FIRST:012d}"\n')
    proc, ports = await start_metersim(fleet)
    assert len(ports) == args.buses, ports
    stop = asyncio.Event()
    tasks: list[asyncio.Task[Any]] = []
    server = None
    try:
        timing = Timing(first_byte=1.0, inter_byte=0.5, gap=args.gap, retries=1, preamble=4)
        meters: list[MeterConfig] = []
        buses: dict[str, Bus] = {}
        for n, port in enumerate(ports):
            link = TcpLink(f"line-{n + 1}", "127.0.0.1", port)
            buses[link.name] = Bus(link, timing)
            tasks += [asyncio.create_task(link.run(stop)), asyncio.create_task(buses[link.name].run(stop))]
            first = FIRST + n * args.per_bus
            meters += [MeterConfig(address=f"{a:012d}", link=link.name) for a in range(first, first + args.per_bus)]
        assert all([await b.link.wait_up(10) for b in buses.values()])
        journal = Journal(tmp / "state" / "journal.sqlite", JournalConfig())
        await journal.open()
        plan = PlanConfig(name="bench", items=ITEMS, every="15m")
        obs = Counting()
        scheduler = Scheduler([plan], {plan.name: meters}, bus_for=lambda m: buses.get(m.link),
                              reader=Dlt645Reader("bench", TZ, lambda m: timing), journal=journal, observer=obs,
                              station="bench", tz=TZ)

        boundary = asyncio.Event()  # set for a moment at the end of every round

        async def rounds() -> None:
            while not stop.is_set():
                await scheduler.run_round(plan)
                boundary.set()
                boundary.clear()  # waiters already woken; the next wait is for the next round

        collecting = asyncio.create_task(rounds())
        if args.tune_gc:  # as `meterd run` does once its parts exist
            tune_gc(args.gen0 or None)
        await asyncio.sleep(args.warmup)
        profiler = cProfile.Profile() if args.profile else None
        if profiler:
            profiler.enable()
        phase1 = await window(args.duration, obs, journal, proc.pid, list(buses.values()), boundary, {})
        if profiler:
            profiler.disable()
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(30)
            phase1["profile"] = text.getvalue()
        phase2: dict[str, Any] = {}
        phase3: dict[str, Any] = {}
        if not args.no_influx:
            from tests.server_process import find_binary, free_tcp_ports, http_request  # noqa: PLC0415
            from tests.services import InfluxDB  # noqa: PLC0415

            http_port, rpc_port = free_tcp_ports(2)
            server = InfluxDB(find_binary("influxd"), tmp / "influxd", http_port, rpc_port=rpc_port)
            (tmp / "influxd").mkdir()
            await asyncio.to_thread(server.start)
            await asyncio.to_thread(server.create_database, "meterd")
            sink = InfluxSink(InfluxSinkConfig(name="influx", api="v1", url=server.url, database="meterd",
                                               batch_lines=args.batch, timeout=30.0))
            influxd = server._proc.pid if server._proc else proc.pid
            extra = {"points": lambda: float(sink.counters["sent_lines"]), "influxd_cpu": lambda: cpu_of(influxd)}
            backlog0, appended0 = await journal.backlog(sink.cursor), journal.stats["appended"]
            if not args.drain_only:
                tasks.append(asyncio.create_task(sink.run(journal, stop)))
                phase2 = await window(args.duration, obs, journal, proc.pid, list(buses.values()), boundary, extra)
                backlog1, appended1 = await journal.backlog(sink.cursor), journal.stats["appended"]
                phase2.update(backlog_start=backlog0, backlog_end=backlog1,
                              forwarded_per_s=(appended1 - appended0 + backlog0 - backlog1) / phase2["seconds"])
            collecting.cancel()  # phase 3: the sink alone drains the backlog
            await asyncio.wait([collecting], timeout=30)
            if args.drain_only:  # the sink starts now, with everything collected so far waiting
                backlog1 = await journal.backlog(sink.cursor)
                tasks.append(asyncio.create_task(sink.run(journal, stop)))
            lines0, cpu0, t0 = sink.counters["sent_lines"], time.process_time(), time.perf_counter()
            influxd0 = cpu_of(influxd)
            while time.perf_counter() - t0 < args.duration and await journal.backlog(sink.cursor) > 0:
                await asyncio.sleep(0.2)
            elapsed = time.perf_counter() - t0
            backlog2 = await journal.backlog(sink.cursor)
            lines = sink.counters["sent_lines"] - lines0
            phase3 = {"seconds": elapsed, "points_per_s": lines / elapsed,
                      "forwarded_per_s": (backlog1 - backlog2) / elapsed,
                      "backlog_end": backlog2, "cpu_share": (time.process_time() - cpu0) / elapsed,
                      "cpu_us_per_point": (time.process_time() - cpu0) / max(lines, 1) * 1e6,
                      "influxd_cpu_share": (cpu_of(influxd) - influxd0) / elapsed, "sink": dict(sink.counters)}
            q = "SELECT count(voltage_a) FROM voltage"
            status, body = await asyncio.to_thread(
                http_request, "GET", f"{server.url}/query?db=meterd&q={q.replace(' ', '%20')}")
            phase3["voltage_points_in_influxd"] = json.loads(body)["results"][0]["series"][0]["values"][0][1] \
                if status == 200 else None
        collecting.cancel()  # the rounds first: meters of a round cut short are not failures
        await asyncio.wait([collecting], timeout=30)
        stop.set()
        await asyncio.wait(tasks, timeout=30)
        await journal.close()
        return {"meters": len(meters), "buses": len(buses), "items": ITEMS, "gap_s": args.gap, "base_port": base,
                "phase1": phase1, "phase2": phase2, "phase3": phase3, "failures": dict(obs.reasons),
                "metersim_peak_rss_mb": vm("VmHWM", proc.pid)}
    finally:
        stop.set()
        if server is not None:
            await asyncio.to_thread(server.stop)
        proc.terminate()
        await proc.wait()


def show(r: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"scale bench: {r['meters']} meters on {r['buses']} TCP buses (metersim baud 0, ports {r['base_port']}.."
          f"{r['base_port'] + r['buses'] - 1}), items {' + '.join(r['items'])}, gap {r['gap_s'] * 1000:g} ms, "
          f"{args.duration:g} s per phase, {os.cpu_count()} CPUs, load average {r['load'][0]:.1f} at the start, "
          f"{r['load'][1]:.1f} at the end; event loop {r['loop']}, GC {r['gc']}")
    flags = (" --no-influx" if args.no_influx else " --drain-only" if args.drain_only else "") + \
        ("" if args.tune_gc else " --no-tune-gc") + \
        (f" --gen0 {args.gen0}" if args.tune_gc and args.gen0 != GEN0_THRESHOLD else "")
    print(f"reproduce: .venv/bin/python bench/scale.py --duration {args.duration:g} --loop {r['loop']}{flags}")
    for name in ("phase1", "phase2"):
        p = r[name]
        if not p:
            continue
        label = "phase 1, journal" if name == "phase1" else "phase 2, journal + InfluxDB v1 sink"
        print(f"\n{label}:")
        sink = "" if name == "phase1" else ", sink included"
        print(f"  meters collected        {p['reads_ok']:>10}   ({p['reads_per_s']:.0f}/s, failed {p['reads_failed']})")
        print(f"  CPU per successful read {p['cpu_us_per_transaction']:>10.1f} µs   (one request answered, the read of "
              f"bench/bus.py's reads/s; target <= 100{sink}; {p['transactions']} reads)")
        per_meter = p["readings_per_s"] / max(p["reads_per_s"], 1e-9)
        print(f"  CPU per meter collected {p['cpu_us_per_read']:>10.1f} µs   ({p['transactions_per_read']:.2f} reads, "
              f"{per_meter:.0f} readings committed; this process "
              f"{p['cpu_share']:.0%} of a core, metersim {p['metersim_cpu_share']:.0%}; {p['kernel_share_of_cpu']:.0%} "
              "of it in the kernel: sockets, wake-ups, fsync)")
        print(f"  by thread, µs per meter {p['thread_cpu_us_per_read']}")
        print(f"  readings into journal   {p['readings_per_s']:>10.0f} /s")
        print(f"  RSS now / peak          {p['rss_mb']:>7.0f} / {p['peak_rss_mb']:.0f} MB")
        if name == "phase2":
            print(f"  points into influxd     {p['points_per_s']:>10.0f} /s   (target >= 20,000; lines; readings "
                  f"{p['forwarded_per_s']:.0f}/s; backlog {p['backlog_start']} -> {p['backlog_end']} readings; "
                  f"influxd {p['influxd_cpu_per_s']:.0%} of a core)")
        if "profile" in p:
            print(p["profile"])
    p3 = r["phase3"]
    if p3:
        print("\nphase 3, the sink alone drains the backlog (collection stopped):")
        print(f"  points into influxd     {p3['points_per_s']:>10.0f} /s   (lines; readings "
              f"{p3['forwarded_per_s']:.0f}/s; "
              f"{p3['cpu_us_per_point']:.1f} µs CPU per point here, {p3['cpu_share']:.0%} of a core; influxd "
              f"{p3['influxd_cpu_share']:.0%}; backlog left {p3['backlog_end']}; "
              f"{p3['voltage_points_in_influxd']} voltage points counted in influxd)")
    print(f"\nmetersim peak RSS {r['metersim_peak_rss_mb']:.0f} MB; failures {r['failures'] or 'none'}")


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    """One measurement in this process, on the event loop `args.loop` names."""
    factory = loop_factory(args.loop)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="meterd-scale-") as tmp, asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(bench(args, Path(tmp)))
    result["load"] = (load, os.getloadavg()[0])  # other work on the machine skews wall-clock rates
    result["loop"] = "asyncio" if factory is None else "uvloop"
    result["gc"] = f"tuned after set-up (frozen, gen-0 threshold {args.gen0 or 'default'})" if args.tune_gc \
        else "default"
    return result


def run_child(args: argparse.Namespace, loop: str) -> dict[str, Any]:
    """One measurement in a fresh process (its own peak RSS, heap and GC), as JSON."""
    argv = [sys.executable, str(Path(__file__).resolve()), "--json", "--loop", loop]
    for name, value in vars(args).items():
        if name in ("json", "loop") or value is None or (value is False and name != "tune_gc"):
            continue
        if name == "tune_gc":
            argv += [] if value else ["--no-tune-gc"]
            continue
        argv += [f"--{name.replace('_', '-')}"] + ([] if value is True else [str(value)])
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {loop} run failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=30.0, help="seconds measured per phase")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--buses", type=int, default=100)
    p.add_argument("--per-bus", type=int, default=100)
    p.add_argument("--gap", type=float, default=0.0, help="the gateway's gap between frames, s")
    p.add_argument("--batch", type=int, default=5000, help="sink lines per request")
    p.add_argument("--base-port", type=int, default=0, help="first metersim port (default: a free block)")
    p.add_argument("--no-influx", action="store_true", help="phase 1 only")
    p.add_argument("--drain-only", action="store_true",
                   help="no phase 2: the sink starts when collection stops and drains all of it (its drain rate)")
    p.add_argument("--profile", action="store_true", help="cProfile phase 1 (slows it down)")
    p.add_argument("--loop", choices=("auto", "asyncio", "uvloop", "both"), default="auto",
                   help="meterd's event loop (auto: uvloop when installed, as meterd run); both: asyncio, then "
                        "uvloop, each in a fresh process")
    p.add_argument("--no-tune-gc", dest="tune_gc", action="store_false",
                   help="CPython's default GC instead of the daemon's runtime.tune_gc() once set up")
    p.add_argument("--gen0", type=int, default=GEN0_THRESHOLD,
                   help="gen-0 threshold tune_gc sets (0: only gc.freeze())")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    logging.basicConfig(level=logging.ERROR)  # a round cut short at the end logs nothing worth reading
    results = [run_child(args, loop) for loop in ("asyncio", "uvloop")] if args.loop == "both" else [run_one(args)]
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=1, default=str))
        return 0
    for result in results:
        show(result, args)
    if len(results) > 1:
        a, b = (r["phase1"] for r in results)
        print(f"\nasyncio vs uvloop, phase 1: {a['cpu_us_per_read']:.1f} vs {b['cpu_us_per_read']:.1f} µs CPU per "
              f"read, {a['cpu_us_per_transaction']:.1f} vs {b['cpu_us_per_transaction']:.1f} µs per transaction, "
              f"{a['reads_per_s']:.0f} vs {b['reads_per_s']:.0f} reads/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
