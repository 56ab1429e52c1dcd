"""The InfluxDB sink's read path on the real journal: rows encoded where the journal reads them give
the same lines as readings; reading the next batch while one is sent, and not waiting for the cursor's
commit, keep the cursor in order and never past what the server took.

Runs the real SQLite journal and the scripted HTTP server of test_sinks.py on 127.0.0.1."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from gateway import journal_store as store
from gateway.journal import Journal
from gateway.model import Quality, Reading
from gateway.sinks import InfluxSink, InfluxSinkConfig
from gateway.sinks.base import ADVANCES_IN_FLIGHT
from gateway.sinks.lineproto import reading_lines, row_lines
from tests.gateway.test_sinks import Script, Scripted

T0 = 1_700_000_000


@pytest.fixture
async def server() -> AsyncIterator[Callable[[Script], Awaitable[Scripted]]]:
    """test_sinks' scripted InfluxDB /write on a free 127.0.0.1 port."""
    runners: list[web.AppRunner] = []

    async def start(script: Script) -> Scripted:
        scripted = Scripted(script)
        app = web.Application()
        app.router.add_post("/write", scripted.handle)
        runners.append(web.AppRunner(app))
        await runners[-1].setup()
        await web.TCPSite(runners[-1], "127.0.0.1", 0).start()
        scripted.url = f"http://127.0.0.1:{runners[-1].addresses[0][1]}"
        return scripted

    yield start
    for runner in runners:
        await runner.cleanup()


def reading(meter: str, quantity: str, value: Any, t: float = T0 + 0.25, **kw: Any) -> Reading:
    return Reading(meter, quantity, value, "", t, t + 1, kw.pop("station", "north"), kw.pop("link", "rs485-1"),
                   "p", **kw)


def varied() -> list[Reading]:
    """Every value type and edge the schema knows, merged points and a field written twice in a second."""
    return [
        reading("000000000001", "forward_active_energy", 1.5),
        reading("000000000001", "forward_active_energy_t1", 1e16),
        reading("000000000001", "forward_active_energy_t2", -0.0),
        reading("000000000001", "voltage_a", math.nan),
        reading("000000000001", "voltage_b", math.inf),
        reading("000000000001", "voltage_a", 220.5, t=T0 + 0.75),  # same point, later wins in its first place
        reading("000000000002", "status_word_1", 2**64),  # beyond int64: stored as digits, not writable
        reading("000000000002", "status_word_2", -(2**40)),
        reading("000000000002", "status_word_3", True),
        reading("000000000002", "date", 'a "quoted"\nline\\'),
        reading("000000000002", "time", None),
        reading("000000000003", "voltage_c", 1.0, quality=Quality.INVALID),
        reading("000000000003", "current_a", None, quality=Quality.LENGTH_MISMATCH, frozen=True),
        reading("000000000003", "current_b", 3.0, frozen=True, station="st,a=1 b", link="line 1"),
        reading("000000000004", "remaining_money", 12.25, t=T0 + 3600),
    ]


async def test_rows_give_the_lines_their_readings_give(tmp_path: Path) -> None:
    async with Journal(tmp_path / "journal.sqlite") as journal:
        await journal.append(varied())
        for limit in (1, 4, 7, 100):
            after = 0
            while True:
                entries, last, lines = await journal.read_rows("sink:x", limit, row_lines, after)
                rows = await journal.read(lambda conn, a=after, n=limit: conn.execute(store.READ_BATCH, (a, n))
                                          .fetchall())
                expected = [store.from_row(row[1:]) for row in rows]
                assert lines == reading_lines(expected)
                assert entries == len(expected)
                if not entries:
                    break
                after = last
        _, _, everything = await journal.read_rows("sink:x", 100, row_lines)
    assert everything[0] == ("energy,link=rs485-1,meter=000000000001,station=north forward_active_energy=1.5,"
                             f"forward_active_energy_t1=1.0e+16,forward_active_energy_t2=-0.0 {T0}")
    assert f"voltage,link=rs485-1,meter=000000000001,station=north voltage_a=220.5 {T0}" in everything


def test_rows_a_newer_meterd_wrote_read_like_from_row() -> None:
    row = store.to_row(reading("000000000001", "voltage_a", 1.0))
    odd = [(1, *row[:3], "decimal", *row[4:]), (2, *row[:11], "from-a-newer-meterd"), (3, *row[:2], None, *row[3:])]
    for one in odd:
        assert row_lines([one]) == reading_lines([store.from_row(one[1:])])
    assert row_lines(odd) == [f'voltage,link=rs485-1,meter=000000000001,station=north voltage_a_quality="invalid" {T0}']


def sink(url: str, **kw: Any) -> InfluxSink:
    return InfluxSink(InfluxSinkConfig(name="influx", url=url, api="v1", database="meters", batch_lines=10,
                                       retry_initial=0.01, retry_max=0.02, flush_interval=0.05, **kw))


async def drain(journal: Journal, forward: InfluxSink, upto: int) -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(forward.run(journal, stop))
    try:
        async with asyncio.timeout(10):
            while await journal.read(store.position, store.READINGS, forward.cursor) < upto:
                await asyncio.sleep(0.01)
    finally:
        stop.set()
        await task


def meters_of(lines: list[str]) -> list[int]:
    return [int(line.split("meter=")[1].split(",")[0]) for line in lines]


async def test_the_cursor_moves_in_order_and_never_past_what_the_server_took(server: Any, tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    seen: list[tuple[int, int]] = []  # (cursor when a request arrives, the last id the server settled by then)
    settled = 0  # one line per reading, ids 1..95: the highest id taken (204) or rejected alone (400)

    def script(n: int, lines: list[str], request: web.Request) -> int:
        nonlocal settled
        conn = store.connect(path, readonly=True)
        try:
            seen.append((store.position(conn, store.READINGS, "sink:influx"), settled))
        finally:
            conn.close()
        status = 500 if n in (2, 3) else 413 if n == 6 else 400 if "meter=000000000077" in "".join(lines) else 204
        if status == 204 or (status == 400 and len(lines) == 1):
            settled = max(meters_of(lines))
        return status

    srv = await server(script)
    async with Journal(path) as journal:
        await journal.append([reading(f"{i:012d}", "voltage_a", float(i)) for i in range(1, 96)])
        forward = sink(srv.url)
        await drain(journal, forward, 95)
    assert meters_of(srv.written) == [i for i in range(1, 96) if i != 77]  # each once, in order; 77 rejected
    assert forward.counters["retries"] == 2 and forward.counters["dropped_lines"] == 1
    positions = [position for position, _ in seen]
    assert positions == sorted(positions) and all(position <= done for position, done in seen)
    # what a restart would send again is bounded: the moves not committed yet, and the batch being sent
    assert all(done - position <= (ADVANCES_IN_FLIGHT + 1) * 10 for position, done in seen)


async def test_a_batch_read_ahead_when_stopped_is_sent_by_the_next_run(server: Any, tmp_path: Path) -> None:
    refusing = True
    srv = await server(lambda n, lines, request: 503 if refusing and n >= 2 else 204)
    async with Journal(tmp_path / "journal.sqlite") as journal:
        await journal.append([reading(f"{i:012d}", "voltage_a", float(i)) for i in range(1, 46)])
        first = sink(srv.url)
        stop = asyncio.Event()
        task = asyncio.create_task(first.run(journal, stop))
        async with asyncio.timeout(10):
            while first.counters["retries"] < 2:
                await asyncio.sleep(0.01)
        stop.set()
        await task
        assert await journal.read(store.position, store.READINGS, first.cursor) == 20
        refusing = False
        await drain(journal, sink(srv.url), 45)
    assert meters_of(srv.written) == list(range(1, 46))
