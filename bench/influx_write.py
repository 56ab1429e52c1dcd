"""InfluxDB sink throughput: readings from the journal into influxd 1.x over loopback.

    .venv/bin/python bench/influx_write.py                 # 200k lines per case, batches of 5000 lines
    .venv/bin/python bench/influx_write.py --quick         # CI smoke, ~5 s
    .venv/bin/python bench/influx_write.py --journal sqlite --fields 3   # the real journal only, 3 fields a line
    .venv/bin/python bench/influx_write.py --url http://127.0.0.1:8086   # an influxd you run
    .venv/bin/python bench/influx_write.py --json

Without --url the bench starts its own influxd (Debian's `influxdb` package, the same
server class as tests/services.py) in a temp dir on free 127.0.0.1 ports and removes it
afterwards. Each case writes into a fresh database through the real `InfluxSink.run` loop
(journal read -> line protocol -> gzip -> POST /write?precision=s -> 204 -> cursor
advance), with `batch_lines` readings per request. Journal `sqlite`: the real one (WAL,
synchronous=FULL) in a temp dir, filled once per case shape, a fresh sink cursor per case:
the daemon's path (rows encoded in the reader thread, the next batch read while one is sent,
cursor commits not waited for). Journal `list`: an in-memory fake of `read_batch`, the path
of a journal without `read_rows` (Readings encoded on the event loop, one batch at a time).
A reading is one field; `--fields` readings of the same meter and time merge into one line
(5 = an energy total and four tariffs, the usual daily read). Reported: lines/s and
readings/s (wall clock, until the cursor's last commit), our process' CPU µs per line
(influxd's CPU is not included), and the encode-only rates of `reading_lines` (Readings) and
`row_lines` (journal rows). After each case the bench checks the line count in influxd.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway import journal_store as store
from gateway.journal import Journal
from gateway.model import Reading, RoundStats
from gateway.sinks import InfluxSink, InfluxSinkConfig
from gateway.sinks.lineproto import reading_lines, row_lines
from tests.server_process import find_binary, free_tcp_ports, http_request
from tests.services import InfluxDB

T0 = 1_700_000_000
QUANTITIES = ("forward_active_energy", *(f"forward_active_energy_t{t}" for t in range(1, 9)))


class ListJournal:
    """The five journal methods over a list; ids are 1..n, so a cursor is a list index."""

    def __init__(self, readings: list[Reading]) -> None:
        self.readings = readings
        self.cursor = 0

    async def read_batch(self, cursor: str, limit: int) -> list[tuple[int, Reading]]:
        end = min(self.cursor + limit, len(self.readings))
        return [(i + 1, self.readings[i]) for i in range(self.cursor, end)]

    async def advance(self, cursor: str, upto_id: int) -> None:
        self.cursor = upto_id

    async def backlog(self, cursor: str) -> int:
        return len(self.readings) - self.cursor

    async def read_rounds(self, cursor: str, limit: int) -> list[tuple[int, RoundStats]]:
        return []

    async def advance_rounds(self, cursor: str, upto_id: int) -> None:
        return None


def make_readings(count: int, fields: int, meters: int = 1000) -> list[Reading]:
    out = []
    per_slot = meters * fields
    for n in range(count):
        slot, rest = divmod(n, per_slot)
        meter, q = divmod(rest, fields)
        t = T0 + 900 * slot
        out.append(Reading(meter=f"{meter:012d}", quantity=QUANTITIES[q], value=1000.0 + n * 0.01, unit="kWh",
                           time=t, collected=t + 5, station="north", link=f"bus{meter % 32}"))
    return out


def count_points(url: str, db: str) -> int:
    q = urllib.parse.urlencode({"db": db, "q": "SELECT COUNT(forward_active_energy) FROM energy"})
    status, body = http_request("GET", f"{url}/query?{q}")
    assert status == 200, body
    series = json.loads(body)["results"][0].get("series", [])
    return int(series[0]["values"][0][1]) if series else 0


async def position(journal: ListJournal | Journal, cursor: str) -> int:
    """The sink's durable cursor (the real journal: its last committed move)."""
    if isinstance(journal, ListJournal):
        return journal.cursor
    return await journal.read(store.position, store.READINGS, cursor)


async def write_case(url: str, journal: ListJournal | Journal, readings: list[Reading], batch: int,
                     gzip: bool) -> dict[str, Any]:
    db = f"bench_{uuid.uuid4().hex[:8]}"
    q = urllib.parse.urlencode({"q": f'CREATE DATABASE "{db}"'})
    assert http_request("POST", f"{url}/query?{q}", b"")[0] == 200
    sink = InfluxSink(InfluxSinkConfig(name=db, api="v1", url=url, database=db, batch_lines=batch,
                                       gzip=gzip, flush_interval=0.01, timeout=30.0))
    stop = asyncio.Event()
    wall, cpu = time.perf_counter(), time.process_time()
    task = asyncio.create_task(sink.run(journal, stop))
    while await position(journal, sink.cursor) < len(readings) and not task.done():  # ids are 1..n
        await asyncio.sleep(0.005)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    stop.set()
    await task
    lines = sink.counters["sent_lines"]
    points = count_points(url, db)
    assert sink.counters["dropped_lines"] == 0 and sink.counters["retries"] == 0, sink.counters
    return {"journal": "list" if isinstance(journal, ListJournal) else "sqlite", "gzip": gzip,
            "readings": len(readings), "lines": lines, "requests": sink.counters["sent_batches"],
            "seconds": round(wall, 3), "lines_per_s": round(lines / wall),
            "readings_per_s": round(len(readings) / wall), "cpu_us_per_line": round(cpu / lines * 1e6, 1),
            "points_in_influxd": points}


def encode_rates(readings: list[Reading], batch: int) -> tuple[float, float]:
    """Lines/s of `reading_lines` over Readings and of `row_lines` over the same readings as journal rows."""
    rows = [(n + 1, *store.to_row(r)) for n, r in enumerate(readings)]
    rates = []
    for encode, items in ((reading_lines, readings), (row_lines, rows)):
        started = time.perf_counter()
        lines = sum(len(encode(items[i:i + batch])) for i in range(0, len(items), batch))  # type: ignore[operator]
        rates.append(lines / (time.perf_counter() - started))
    return rates[0], rates[1]


async def main_async(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    results = []
    for fields in args.fields:
        readings = make_readings(args.lines * fields, fields)
        readings_rate, rows_rate = encode_rates(readings, args.batch * fields)
        for kind in args.journal:
            journal: ListJournal | Journal = ListJournal(readings)
            if kind == "sqlite":
                journal = Journal(tmp / f"journal-{fields}.sqlite")
                await journal.open()
                for i in range(0, len(readings), 2000):
                    await journal.append(readings[i:i + 2000])
            for gzip in (True, False):
                if isinstance(journal, ListJournal):
                    journal.cursor = 0
                # batch_lines counts journal entries (readings); lines per request = batch (merged fields)
                result = await write_case(args.url, journal, readings, args.batch * fields, gzip)
                result.update(fields_per_line=fields, encode_lines_per_s=round(readings_rate),
                              encode_rows_lines_per_s=round(rows_rate))
                results.append(result)
            if isinstance(journal, Journal):
                await journal.close()
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="an influxd 1.x to write to (default: start one)")
    p.add_argument("--lines", type=int, default=200_000, help="lines per case (default 200000)")
    p.add_argument("--batch", type=int, default=5000, help="lines per request (default 5000)")
    p.add_argument("--fields", type=lambda s: [int(x) for x in s.split(",")], default=[1, 5],
                   help="readings merged per line, comma-separated cases (default 1,5)")
    p.add_argument("--journal", type=lambda s: s.split(","), default=["sqlite", "list"],
                   help="sqlite (the real journal, the daemon's path), list (in-memory, Readings): comma-separated")
    p.add_argument("--quick", action="store_true", help="20k lines, one field per line, the real journal")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.lines, args.fields, args.journal = 20_000, [1], ["sqlite"]
    server = None
    with tempfile.TemporaryDirectory(prefix="meterd-bench-") as tmp:
        if args.url is None:
            http_port, rpc_port = free_tcp_ports(2)
            server = InfluxDB(find_binary("influxd"), Path(tmp), http_port, rpc_port=rpc_port)
            server.start()
            args.url = server.url
        try:
            results = asyncio.run(main_async(args, Path(tmp)))
        finally:
            if server is not None:
                server.stop()
    if args.json:
        print(json.dumps(results, indent=2))
        return
    print(f"influxd 1.x at {args.url}, /write precision=s, {args.batch} lines per request")
    print(f"{'fields/line':>11} {'journal':>7} {'gzip':>5} {'lines':>8} {'s':>7} {'lines/s':>9} {'readings/s':>11} "
          f"{'CPU µs/line':>11} {'encode lines/s: readings':>24} {'rows':>8}")
    for r in results:
        print(f"{r['fields_per_line']:>11} {r['journal']:>7} {r['gzip']!s:>5} {r['lines']:>8} {r['seconds']:>7.2f} "
              f"{r['lines_per_s']:>9} {r['readings_per_s']:>11} {r['cpu_us_per_line']:>11} "
              f"{r['encode_lines_per_s']:>24} {r['encode_rows_lines_per_s']:>8}")
        assert r["points_in_influxd"] == r["lines"], r


if __name__ == "__main__":
    main()
