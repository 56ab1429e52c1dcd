"""The journal on real SQLite files: round trips, group commit, SIGKILL durability, sink
cursors, duplicates, retention by age and bytes, round statistics, and its errors."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import journal_store as store
from gateway.journal import BadReading, Journal, JournalConfig, JournalError
from gateway.model import Quality, Reading, RoundStats

ROOT = Path(__file__).resolve().parents[2]
FAST = JournalConfig(commit_interval=0.01)
NOW = time.time()
DAY = 86400.0


def reading(meter: int = 1, quantity: str = "forward_active_energy", value=1.5, t: float = 1_700_000_000.0,
            collected: float | None = None, **kw) -> Reading:
    return Reading(meter=f"{meter:012d}", quantity=quantity, value=value, unit="kWh", time=t,
                   collected=NOW if collected is None else collected, **kw)


def series(n: int, meter: int = 1, t0: float = 1_700_000_000.0, collected: float | None = None) -> list[Reading]:
    return [reading(meter, "forward_active_energy", float(i), t0 + 900 * i, collected) for i in range(n)]


@pytest.fixture
async def journal(tmp_path):
    async with Journal(tmp_path / "state" / "journal.sqlite", FAST) as j:
        yield j


# ---- round trips ----

async def test_every_value_type_round_trips_exactly(journal):
    values = [1206.42, 0.0, -3.5, 7, 0, -12, 2**70, "2024-05-01 00:00", "", True, False, None]
    sent = [reading(1, f"q{i}", v, station="s1", link="bus1", plan="daily", frozen=i % 2 == 0,
                    quality=Quality.LENGTH_MISMATCH if i == 3 else Quality.GOOD) for i, v in enumerate(values)]
    await journal.append(sent)
    got = await journal.query("000000000001", quantity=None, limit=100)
    assert sorted(got, key=lambda r: r.quantity) == sorted(sent, key=lambda r: r.quantity)
    for r in got:
        assert type(r.value) is type(values[int(r.quantity[1:])]), r
    await journal.append([reading(2, "nan", math.nan)])
    [nan] = await journal.query("000000000002")
    assert isinstance(nan.value, float) and math.isnan(nan.value)


def _property_conn() -> sqlite3.Connection:
    conn = store.connect(Path(tempfile.mkdtemp()) / "p.sqlite", readonly=False)
    store.prepare(conn, Path("p.sqlite"))
    return conn


PROP = _property_conn()
values = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**80), max_value=2**80),
                   st.floats(allow_nan=False), st.text())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=values, t=st.floats(0, 4e9), frozen=st.booleans(), quality=st.sampled_from(Quality))
def test_value_types_property(value, t, frozen, quality):
    PROP.execute("DELETE FROM readings")
    sent = reading(5, "x", value, t, frozen=frozen, quality=quality)
    PROP.execute(store.INSERT_READING, store.to_row(sent))
    [got] = store.query(PROP, meter=sent.meter)
    assert got == sent and type(got.value) is type(value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keys=st.lists(st.tuples(st.integers(0, 3), st.sampled_from("abc"), st.integers(0, 5)), max_size=300))
def test_multi_row_insert_equals_one_row_at_a_time(keys):
    """Any row count (chunks of 64 down to 1), duplicates inside one statement and across chunks:
    the same rows and the same count of new ones as one INSERT OR IGNORE per row."""
    rows = [store.to_row(reading(m, q, float(i), 1_700_000_000.0 + t)) for i, (m, q, t) in enumerate(keys)]
    results = []
    for insert in (store.insert_rows, lambda conn, rs: conn.executemany(store.INSERT_READING, rs)):
        PROP.execute("DELETE FROM readings")
        before = PROP.total_changes
        insert(PROP, rows)
        results.append((PROP.total_changes - before,
                        PROP.execute(f"SELECT {store.COLUMNS} FROM readings ORDER BY id").fetchall()))
    assert results[0] == results[1]
    assert results[0][0] == len(set(keys))


async def test_unsupported_value_is_a_typed_error(journal):
    with pytest.raises(BadReading, match="list"):
        await journal.append([reading(value=[1, 2])])
    await journal.append([reading()])  # the journal is fine afterwards


async def test_query_filters_and_order(journal):
    await journal.append(series(50) + series(5, meter=2))
    await journal.append([reading(1, "voltage_a", 220.1, 1_700_000_000.0 + 900 * 10)])
    got = await journal.query("000000000001", since=1_700_000_000.0 + 900 * 10, until=1_700_000_000.0 + 900 * 20,
                              quantity="forward_active_energy", limit=5)
    assert [r.value for r in got] == [16.0, 17.0, 18.0, 19.0, 20.0]  # the newest 5, newest last
    assert len(await journal.query("000000000001", limit=1000)) == 51
    assert await journal.meters() == ["000000000001", "000000000002"]
    assert journal.alive


# ---- group commit ----

async def test_concurrent_appends_share_transactions(tmp_path):
    async with Journal(tmp_path / "j.sqlite", JournalConfig(commit_interval=0.05)) as j:
        await asyncio.gather(*(j.append(series(20, meter=m)) for m in range(50)))
        assert j.stats["appended"] == 1000
        assert 1 <= j.stats["batches"] < 50, j.stats
        assert len(await j.meters()) == 50
        assert j.stats["commit_seconds_total"] > 0


async def test_appends_of_one_loop_turn_go_as_one_request_in_order_and_each_caller_on_its_own(tmp_path):
    async with Journal(tmp_path / "j.sqlite", FAST) as j:
        shared = [j.append_nowait(series(3, meter=m)) for m in (1, 2)]
        assert shared[0] is shared[1]  # one hand-over to the writer for the whole turn
        with pytest.raises(BadReading):  # refused before it is queued: the others are not touched
            j.append_nowait([reading(3, value=object())])
        victim = asyncio.ensure_future(j.append(series(3, meter=4)))
        seen = asyncio.ensure_future(j.write(lambda conn: conn.execute("SELECT count(*) FROM readings").fetchone()[0]))
        survivor = asyncio.ensure_future(j.append(series(3, meter=5)))
        await asyncio.sleep(0)
        victim.cancel()  # a cancelled caller must not cancel the request it shares with others
        assert await seen == 9  # the appends made before it are committed before it runs
        await survivor
        await asyncio.gather(*shared)
        assert len(await j.meters()) == 4 and j.stats["appended"] == 12


CHILD = textwrap.dedent("""
    import asyncio, sys, time
    sys.path.insert(0, sys.argv[2])
    from pathlib import Path
    from gateway.journal import Journal, JournalConfig
    from gateway.model import Reading

    async def worker(j, w):
        for n in range(10**6):
            await j.append([Reading(f"{w:012d}", f"q{k}", n * 10 + k, "kWh", float(n), time.time())
                            for k in range(10)])
            print(f"acked {w} {n}", flush=True)

    async def main():
        j = Journal(Path(sys.argv[1]), JournalConfig(commit_interval=0.002))
        await j.open()
        await asyncio.gather(*(worker(j, w) for w in range(8)))

    asyncio.run(main())
""")


async def test_acked_readings_survive_sigkill(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    db = tmp_path / "journal.sqlite"
    child = subprocess.Popen([sys.executable, str(script), str(db), str(ROOT)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        async with asyncio.timeout(30):
            while len(lines) < 300:
                line = await asyncio.to_thread(child.stdout.readline)
                assert line, child.stderr.read()
                lines.append(line)
    finally:
        os.kill(child.pid, signal.SIGKILL)  # mid-stream: appends are in flight right now
        rest, _ = child.communicate()
    assert child.returncode == -signal.SIGKILL
    lines += rest.splitlines()  # acks printed before the kill but not read yet
    acked = {(int(w), int(n)) for w, n in re.findall(r"^acked (\d+) (\d+)$", "\n".join(lines), re.M)}
    assert len(acked) >= 300
    async with Journal(db, FAST) as j:
        stored = {(int(r.meter), int(r.time)) for r in await j.query(limit=10**7) if r.quantity == "q0"}
        rows = await j.query(limit=10**7)
    assert acked <= stored, f"{len(acked - stored)} acked batches lost"
    by_key = {(r.meter, r.quantity, r.time): r.value for r in rows}
    assert all(by_key[(f"{w:012d}", f"q{k}", float(n))] == n * 10 + k for w, n in acked for k in range(10))


# ---- sink cursors ----

async def test_cursors_are_independent_and_survive_restart(tmp_path):
    path = tmp_path / "j.sqlite"
    async with Journal(path, FAST) as j:
        await j.append(series(10))
        influx = await j.read_batch("influx", 4)
        assert [r.value for _, r in influx] == [0.0, 1.0, 2.0, 3.0]
        await j.advance("influx", influx[-1][0])
        assert await j.backlog("influx") == 6
        assert await j.backlog("mqtt") == 10  # a new sink starts at 0: the whole journal
        mqtt = await j.read_batch("mqtt", 100)
        assert len(mqtt) == 10
        await j.advance("mqtt", mqtt[1][0])
        await j.advance("mqtt", mqtt[0][0])  # a late advance never moves a cursor back
    async with Journal(path, FAST) as j:
        assert await j.backlog("influx") == 6 and await j.backlog("mqtt") == 8
        assert [r.value for _, r in await j.read_batch("influx", 2)] == [4.0, 5.0]
        await j.append(series(2, t0=2e9))
        assert await j.backlog("mqtt") == 10


async def test_duplicates_are_ignored_and_counted(journal):
    await journal.append(series(5))
    again = [reading(1, "forward_active_energy", 99.0, r.time) for r in series(5)]
    await journal.append([*again, reading(1, "forward_active_energy", 5.0, 9e9)])
    assert journal.stats["appended"] == 6 and journal.stats["duplicates"] == 5
    assert [r.value for r in await journal.query("000000000001")] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]


# ---- retention ----

async def test_retention_by_age_counts_unforwarded(journal, caplog):
    await journal.append(series(30, collected=NOW - 40 * DAY) + series(10, meter=2, collected=NOW))
    batch = await journal.read_batch("influx", 20)
    await journal.advance("influx", batch[-1][0])  # 10 old rows not forwarded yet
    with caplog.at_level(logging.INFO, logger="gateway.journal_retention"):
        dropped = await journal.retain()
    assert dropped == {"age": 30, "bytes": 0, "unforwarded": 10, "rounds": 0}
    assert journal.stats["dropped_age"] == 30 and journal.stats["dropped_unforwarded"] == 10
    assert [r.meter for r in await journal.query(limit=100)] == ["000000000002"] * 10
    assert await journal.backlog("influx") == 10
    assert len([r for r in caplog.records if "retention" in r.getMessage()]) == 1
    assert await journal.retain() == {"age": 0, "bytes": 0, "unforwarded": 0, "rounds": 0}


async def test_retention_by_bytes_drops_oldest_first(tmp_path):
    cap = 400_000
    async with Journal(tmp_path / "j.sqlite", JournalConfig(commit_interval=0.01, max_bytes=cap)) as j:
        for m in range(8):
            await j.append(series(800, meter=m))
        assert (await j.size())["used"] > cap
        await j.advance("influx", 1000)
        dropped = await j.retain()
        assert dropped["bytes"] > 0 and dropped["age"] == 0
        assert dropped["unforwarded"] == dropped["bytes"] - 1000
        assert j.stats["dropped_bytes"] == dropped["bytes"]
        size = await j.size()
        assert size["used"] <= cap and size["file"] <= cap + store.WAL_LIMIT
        kept = await j.read_batch("new-sink", 10**6)
        assert kept[0][0] == dropped["bytes"] + 1 and kept[-1][0] == 6400  # the oldest went, the newest stayed
        await j.append(series(3, meter=99))
        assert (await j.read_batch("new-sink", 10**6))[-1][0] == 6403  # ids are never reused


async def test_run_retention_until_stopped(journal):
    await journal.append(series(3, collected=NOW - 40 * DAY))
    stop = asyncio.Event()
    task = asyncio.create_task(journal.run_retention(stop, every=0.01))
    async with asyncio.timeout(5):
        while journal.stats["dropped_age"] < 3:
            await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 5)


# ---- round statistics ----

async def test_rounds_upsert_and_cursor(tmp_path):
    path = tmp_path / "j.sqlite"
    async with Journal(path, FAST) as j:
        await j.record_round(RoundStats("daily", "daily-1", started=100.0, expected=10))
        await j.record_round(RoundStats("15m", "15m-1", started=110.0, expected=5, collected=5, finished=120.0))
        first = await j.read_rounds("influx", 10)
        assert [s.round_id for _, s in first] == ["daily-1", "15m-1"]
        await j.advance_rounds("influx", first[-1][0])
        update = RoundStats("daily", "daily-1", started=100.0, expected=10, collected=9,
                            failed={"no_reply": 1}, finished=130.0, reread=1)
        await j.record_round(update)
    async with Journal(path, FAST) as j:
        again = await j.read_rounds("influx", 10)
        assert [s for _, s in again] == [update]  # an updated round is forwarded again
        assert await j.rounds_backlog("influx") == 1 and await j.rounds_backlog("mqtt") == 2
        assert [s.round_id for s in await j.recent_rounds()] == ["15m-1", "daily-1"]  # newest first
        assert await j.recent_rounds("daily") == [update]
        assert (await j.recent_rounds(limit=1))[0].success_ratio == 1.0


# ---- errors ----

async def test_unwritable_place_is_a_journal_error(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(JournalError, match="file"):
        await Journal(tmp_path / "file" / "journal.sqlite").open()


RO_CHILD = """
import asyncio, sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from gateway.journal import Journal, JournalError
try:
    asyncio.run(Journal(Path(sys.argv[1]) / "journal.sqlite").open())
except JournalError as exc:
    print("JournalError:", exc)
"""


async def test_read_only_directory_is_a_journal_error():
    state = Path(tempfile.mkdtemp(prefix="meterd-ro-"))  # not under tmp_path: `nobody` must reach it
    state.chmod(0o555)
    cmd = [sys.executable, "-c", RO_CHILD, str(state), str(ROOT)]
    if os.geteuid() == 0:  # root ignores directory permissions: run the child as nobody
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv")
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    try:
        child = await asyncio.create_subprocess_exec(*cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(child.communicate(), 30)
    finally:
        state.chmod(0o755)
        shutil.rmtree(state)
    assert f"JournalError: the journal {state}/journal.sqlite is not writable" in out.decode(), err.decode()


async def test_corrupt_file_is_a_journal_error(tmp_path):
    path = tmp_path / "journal.sqlite"
    path.write_bytes(b"this is not a database, it is a shopping list\n" * 100)
    with pytest.raises(JournalError, match="corrupt"):
        await Journal(path).open()


async def test_second_writer_is_refused(journal):
    with pytest.raises(JournalError, match="in use by another process"):
        await Journal(journal.path).open()


async def test_closed_journal_refuses(tmp_path):
    j = Journal(tmp_path / "j.sqlite")
    assert not j.alive
    with pytest.raises(JournalError, match="not open"):
        await j.append([reading()])


async def test_writer_survives_a_full_disk(journal, caplog):
    await journal.append(series(10))
    conn = journal._writer._conn  # the writer is idle: pin the file at its size to simulate a full disk
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count={pages}")
    with caplog.at_level(logging.ERROR), pytest.raises(JournalError, match="cannot grow"):
        await asyncio.gather(*(journal.append(series(500, meter=m)) for m in range(2, 6)))
    assert journal.stats["write_errors"] >= 1 and "failed" in caplog.text
    assert not journal.alive and "cannot grow" in journal.last_error
    conn.execute("PRAGMA max_page_count=1073741823")
    await journal.append(series(500, meter=2))  # the next append retries and succeeds
    assert len(await journal.query("000000000002", limit=10**4)) == 500
    assert journal.alive and journal.last_error is None


# ---- one commit group settles every request it holds (added with the batched settle) ----

def _note(conn: sqlite3.Connection, text: str) -> int:
    conn.execute("CREATE TABLE IF NOT EXISTS notes (text TEXT)")
    conn.execute("INSERT INTO notes VALUES (?)", (text,))
    return int(conn.execute("SELECT count(*) FROM notes").fetchone()[0])


def _broken(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS notes (text TEXT)")
    conn.execute("INSERT INTO notes VALUES ('never')")
    raise ValueError("refused by the caller's own rule")


async def test_a_group_settles_appends_results_and_a_failed_call_each_on_its_own(tmp_path):
    async with Journal(tmp_path / "j.sqlite", JournalConfig(commit_interval=0.2)) as j:
        await j.append([reading(99)])  # the next requests meet a commit window: one group
        results = await asyncio.gather(j.append(series(5, meter=1)), j.write(_note, "a"), j.write(_broken),
                                       j.append(series(5, meter=2)), j.write(_note, "b"), return_exceptions=True)
        assert results[0] is None and results[3] is None
        assert sorted(results[i] for i in (1, 4)) == [1, 2]
        assert isinstance(results[2], ValueError) and "caller's own rule" in str(results[2])
        assert j.stats["batches"] == 2
        notes = await j.read(lambda conn: [t for (t,) in conn.execute("SELECT text FROM notes ORDER BY rowid")])
        assert notes == ["a", "b"]  # the failed call's insert was rolled back, the others kept
        assert len(await j.query(limit=100)) == 11


async def test_requests_from_two_event_loops_are_each_settled_on_their_own_loop(tmp_path):
    async with Journal(tmp_path / "j.sqlite", JournalConfig(commit_interval=0.05)) as j:

        def other_loop() -> list[None]:
            async def appends() -> list[None]:  # these futures belong to this thread's loop
                return await asyncio.gather(*(j.append(series(3, meter=1000 + n)) for n in range(20)))

            return asyncio.run(asyncio.wait_for(appends(), 30))  # a hang guard, not a timing assertion

        theirs, ours = await asyncio.gather(asyncio.to_thread(other_loop),
                                            asyncio.gather(*(j.append(series(3, meter=m)) for m in range(20))))
        assert theirs == ours == [None] * 20
        assert j.stats["appended"] == 120
        assert len(await j.meters()) == 40


async def test_appends_still_gathering_when_the_journal_closes_are_committed_first(tmp_path):
    path = tmp_path / "j.sqlite"
    j = Journal(path, FAST)
    await j.open()
    pending = j.append_nowait(series(4))
    await j.close()  # before the gathering window ended
    assert pending.done() and pending.exception() is None
    with pytest.raises(JournalError, match="not open"):
        j.append_nowait(series(1, meter=2))
    async with Journal(path, FAST) as again:
        assert len(await again.query("000000000001")) == 4
