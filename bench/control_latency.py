"""A payment for a tripped meter: how long until the meter has acknowledged the restore?

    .venv/bin/python bench/control_latency.py              # 50 trials on a 2400-Bd line of 32 meters
    .venv/bin/python bench/control_latency.py --trials 10  # quick look
    .venv/bin/python bench/control_latency.py --json

metersim runs in a subprocess (bench/bus.py's fleet: one bus of 32 meters, 2400 Bd, reply delay 20-80 ms,
on a TCP exposure). This process runs meterd's parts for it: a `TcpLink` and its `Bus` (default timing),
the real `Control` engine and `Prepaid` policy on a real `Journal` (SQLite WAL) in a temp dir, and
routine polling: 32 tasks reading `forward_active_energy` of their meter over and over, so the line is
never idle and every control frame has to get ahead of a queue of polls (the worst case for latency:
a real 15-minute plan leaves the line idle most of the time).

One trial, on meter i % 32: a billing update puts the account below its trip threshold; the policy's
alarm and trip are verified on the meter (not timed). Then the clock starts and `Prepaid.pay()` is called
with an amount that lifts the balance over the restore threshold; the clock stops when the restore
command (`close`) reaches `acknowledged` (the meter answered 9C). Reported: p50, p95 and max over the
trials (target: p95 <= 2 s), and where the time goes (pay() committed, command submitted, 9C).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bus import fleet_text, start_metersim  # bench/bus.py

from gateway.archive import MeterConfig
from gateway.bus import Bus, Timing
from gateway.control.config import ControlConfig
from gateway.control.model import Action, Command, State
from gateway.control.service import Control
from gateway.journal import Journal
from gateway.links import TcpLink
from gateway.prepaid import Settings
from gateway.prepaid.config import PrepaidConfig
from gateway.prepaid.policy import Prepaid
from gateway.reader import Dlt645Reader

TZ = ZoneInfo("Asia/Shanghai")
METERS = 32


class Watch:
    """Times of state changes by (meter, action, state), from Control.changes()."""

    def __init__(self, control: Control) -> None:
        self.seen: dict[tuple[str, str, str], float] = {}
        self.events: dict[tuple[str, str, str], asyncio.Event] = {}
        self._changes = control.changes()
        self.task = asyncio.create_task(self._follow())

    async def _follow(self) -> None:
        async for command in self._changes:
            self._note(command)

    def _note(self, command: Command) -> None:
        key = (command.meter, str(command.action), str(command.state))
        self.seen[key] = time.perf_counter()
        self.event(key).set()

    def event(self, key: tuple[str, str, str]) -> asyncio.Event:
        return self.events.setdefault(key, asyncio.Event())

    def reset(self, meter: str) -> None:
        for key in [k for k in self.events if k[0] == meter]:
            self.events.pop(key)
            self.seen.pop(key, None)

    async def wait(self, meter: str, action: Action, state: State, timeout: float = 60.0) -> float:
        key = (meter, str(action), str(state))
        await asyncio.wait_for(self.event(key).wait(), timeout)
        return self.seen[key]


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="meterd-control-bench-") as tmp:
        fleet = Path(tmp) / "fleet.toml"
        fleet.write_text(fleet_text(METERS, args.baud, (20, 80), 4))
        sim, ports = await start_metersim(fleet)
        try:
            return await trials(Path(tmp), ports[0], args)
        finally:
            sim.terminate()
            await sim.wait()


async def trials(tmp: Path, port: int, args: argparse.Namespace) -> dict[str, Any]:
    link = TcpLink("bench", "127.0.0.1", port)
    timing = Timing()
    bus = Bus(link, timing)
    meters = {f"{n:012d}": MeterConfig(address=f"{n:012d}", link="bench") for n in range(1, METERS + 1)}
    stop = asyncio.Event()
    async with Journal(tmp / "journal.sqlite") as journal:
        control = Control(ControlConfig(quiet_hours="", trip_rate_per_min=10_000, verify_poll_first=0.2),
                          journal, station="bench", tz=TZ, meter_for=meters.get, bus_for=lambda m: bus,
                          timing_for=lambda m: timing)
        prepaid = Prepaid(PrepaidConfig(enabled=True, restore="close"), journal, control, station="bench",
                          meters=meters.get)
        await control.start()
        await prepaid.start()
        parts = [asyncio.create_task(p) for p in (link.run(stop), bus.run(stop), control.run(stop), prepaid.run(stop))]
        assert await link.wait_up(5), "metersim's line did not come up"
        watch = Watch(control)
        reader = Dlt645Reader("bench", TZ, lambda m: timing)
        polls: dict[str, int] = {"ok": 0, "failed": 0}
        polling = True

        async def poll(meter: MeterConfig) -> None:
            while polling:
                outcome = await reader.read(bus, meter, ["forward_active_energy"], plan="routine")
                polls["ok" if outcome.ok else "failed"] += 1
                if not outcome.ok:
                    polls[f"failed_{outcome.reason}"] = polls.get(f"failed_{outcome.reason}", 0) + 1
                if outcome.readings:
                    await journal.append(outcome.readings)
                    control.observe(outcome.readings)
                    prepaid.observe(outcome.readings)

        pollers = [asyncio.create_task(poll(m)) for m in meters.values()] if args.polling else []
        results: list[dict[str, float]] = []
        tally: dict[str, int] = {}
        try:
            for address in meters:
                await prepaid.upsert_account(address, Settings(price=0))
            for i in range(args.trials):
                address = list(meters)[i % METERS]
                watch.reset(address)
                await prepaid.set_balance(address, "-5.00", f"bill-{i}")
                await watch.wait(address, Action.TRIP, State.VERIFIED)
                watch.reset(address)
                start = time.perf_counter()
                await prepaid.pay(address, "100", f"pay-{i}")
                committed = time.perf_counter()
                submitted = await watch.wait(address, Action.CLOSE, State.PENDING)
                acknowledged = await watch.wait(address, Action.CLOSE, State.ACKNOWLEDGED)
                await watch.wait(address, Action.CLOSE, State.VERIFIED)
                results.append({"pay_s": committed - start, "submitted_s": submitted - start,
                                "acknowledged_s": acknowledged - start})
                if not args.json:
                    print(f"trial {i + 1:3d} meter {address}: restore acknowledged after "
                          f"{acknowledged - start:6.3f} s", flush=True)
            tally = dict(polls)  # before the shutdown fails the polls still queued (link_down)
        finally:
            polling = False
            await asyncio.wait(pollers, timeout=5) if pollers else None
            watch.task.cancel()
            stop.set()
            await asyncio.gather(*parts, return_exceptions=True)
    latencies = sorted(r["acknowledged_s"] for r in results)
    return {
        "trials": len(results), "baud": args.baud, "meters": METERS, "routine_polling": args.polling,
        "polls_ok": tally.get("ok", 0), "polls_failed": tally.get("failed", 0),
        "poll_failures": {k.removeprefix("failed_"): v for k, v in tally.items() if k.startswith("failed_")},
        "p50_s": statistics.median(latencies), "p95_s": percentile(latencies, 0.95), "max_s": latencies[-1],
        "pay_committed_p50_s": statistics.median(r["pay_s"] for r in results),
        "submitted_p50_s": statistics.median(r["submitted_s"] for r in results),
        "frames_sent": control.counters.get("frames_sent", 0),
    }


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    rank = max(1, -(-len(sorted_values) * q // 1))
    return sorted_values[int(rank) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--baud", type=int, default=2400)
    parser.add_argument("--no-polling", dest="polling", action="store_false", help="an idle line, no routine polls")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(bench(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"\n{result['trials']} trials, {result['meters']} meters at {result['baud']} Bd, routine polling "
              f"{'on' if result['routine_polling'] else 'off'} ({result['polls_ok']} polls ok, "
              f"{result['polls_failed']} failed: {result['poll_failures']})")
        print(f"payment -> restore acknowledged (9C): p50 {result['p50_s']:.3f} s, p95 {result['p95_s']:.3f} s, "
              f"max {result['max_s']:.3f} s (target p95 <= 2 s)")
        print(f"  pay() committed after {result['pay_committed_p50_s'] * 1000:.1f} ms, close submitted after "
              f"{result['submitted_p50_s'] * 1000:.1f} ms (p50)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
