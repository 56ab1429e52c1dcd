"""No loss: InfluxDB goes away for a while and meterd is killed with SIGKILL in the middle of a round (once while
influxd is away, with a backlog, and once after it is back), and afterwards influxd holds every reading of the
journal exactly once per (series, timestamp), and nothing else.

Real processes only: `metersim serve` (20 meters behind four TCP serial servers), `meterd run` (a 5 s plan of live
values and a daily-freeze plan, an InfluxDB 1.x sink) and influxd from tests/services.py, stopped and started
again on the same port and data.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.daemon_harness import (
    Meterd,
    Metersim,
    diff,
    influx_points,
    journal_points,
    processes,
    settled,
)
from tests.server_process import free_tcp_port
from tests.services import InfluxDB

pytestmark = pytest.mark.integration

EVERY = 5.0
OUTAGE = 8.0  # s influxd is down
ENERGY = ["forward_active_energy", *(f"forward_active_energy_t{k}" for k in range(1, 5))]
MEASUREMENTS = {**dict.fromkeys(ENERGY, "energy"), "voltage_a": "voltage"}
SERVERS = 4  # TCP serial servers with 5 meters each: a live round takes about 1 s
LINK_OF = {f"{2001 + 100 * n + i:012d}": f"server{n}" for n in range(1, SERVERS + 1) for i in range(5)}
ADDRESSES = list(LINK_OF)


def fleet() -> dict[str, Any]:
    return {"seed": 5, "api": {"listen": "127.0.0.1:0"}, "buses": [
        {"name": f"server{n}", "tcp": "127.0.0.1:0", "baud": 9600, "reply_delay_ms": [10, 30], "meters": 5,
         "first_address": f"{2001 + 100 * n:012d}"} for n in range(1, SERVERS + 1)]}


def config(tmp_path: Path, station: str, api_port: int, ports: list[int], influx: InfluxDB) -> dict[str, Any]:
    return {
        "station": {"name": station, "state_dir": str(tmp_path / "state")},
        "api": {"listen": f"127.0.0.1:{api_port}"},
        "links": [{"name": f"server{n}", "kind": "tcp", "host": "127.0.0.1", "port": port, "reconnect_min": 0.1,
                   "reconnect_max": 1.0} for n, port in enumerate(ports, start=1)],
        "meters": [{"address": a, "link": link} for a, link in LINK_OF.items()],
        "plans": [
            {"name": "live", "items": ["forward_active_energy_block", "voltage_a"], "every": "5s"},
            {"name": "freeze", "items": ["daily_freeze_forward_active_energy_last1"], "every": "10s"},
        ],
        "sinks": [{"name": "influx", "kind": "influxdb", "api": "v1", "url": influx.url, "database": station,
                   "flush_interval": 0.2, "retry_initial": 0.2, "retry_max": 1.0, "timeout": 2.0}],
    }


def finished_live_rounds(status: dict[str, Any]) -> list[dict[str, Any]]:
    return (status["plans"].get("live") or {}).get("history", [])


def kill_mid_round(meterd: Meterd, after: float) -> tuple[dict[str, Any], float]:
    """SIGKILL while a live round that started after `after` has some meters done (committed) and >= 4 to go;
    that round (as the status showed it last) and when meterd died."""
    def half_done() -> dict[str, Any] | None:
        running = meterd.status()["plans"]["live"]["running"]
        return next((r for r in running if r["started"] > after and 0 < r["done"] <= r["expected"] - 4), None)

    killed = meterd.wait(half_done, EVERY + 5, "a live round half done", interval=0.02)
    assert meterd.kill() == -signal.SIGKILL
    return killed, time.time()


def backlog_metric(meterd: Meterd) -> float:
    (value,) = [s.value for f in text_string_to_metric_families(meterd.metrics()) for s in f.samples
                if s.name == "meterd_sink_backlog" and s.labels == {"sink": "influx"}]
    return value


def test_influxdb_outage_and_sigkill_mid_round_lose_and_duplicate_nothing(tmp_path: Path, influxdb: InfluxDB) -> None:
    station = f"noloss_{uuid.uuid4().hex[:8]}"
    influxdb.create_database(station)
    metersim = Metersim(tmp_path / "metersim", fleet())
    kills: list[tuple[dict[str, Any], float]] = []
    with processes(metersim):
        metersim.start()
        ports = [metersim.buses[f"server{n}"].port for n in range(1, SERVERS + 1)]
        meterd = Meterd(tmp_path / "meterd", config(tmp_path, station, free_tcp_port(), ports, influxdb))
        with processes(meterd):
            meterd.start()
            meterd.wait(lambda: finished_live_rounds(meterd.status()) and
                        meterd.status()["sinks"]["influx"]["sent_lines"] > 0, 15, "a live round in influxd")

            with influxdb.stopped():
                # influxd is away: rounds go on into the journal; the sink retries and shows what waits
                down = time.time()
                meterd.wait(lambda: any(r["started"] > down for r in finished_live_rounds(meterd.status())),
                            EVERY + 5, "a live round while influxd is down")
                sink = meterd.wait(lambda: (s := meterd.status()["sinks"]["influx"])["retries"] > 1 and s,
                                   5, "the sink retrying")
                assert sink["state"] == "retrying" and sink["backlog"] > 0, sink
                assert backlog_metric(meterd) > 0

                # SIGKILL mid-round with a backlog, and back on the same state directory while influxd is away
                kills.append(kill_mid_round(meterd, down))
                meterd.start()
                sink = meterd.wait(lambda: (s := meterd.status()["sinks"]["influx"])["retries"] > 0 and s,
                                   5, "the restarted sink retrying")
                assert sink["state"] == "retrying" and sink["backlog"] > 0, sink  # it knows what it still owes
                assert backlog_metric(meterd) > 0
                time.sleep(max(0.0, down + OUTAGE - time.time()))
            up = time.time()

            # SIGKILL mid-round again, influxd up this time; then a couple of rounds and a clean stop
            kills.append(kill_mid_round(meterd, up))
            meterd.start()
            meterd.wait(lambda: len(finished_live_rounds(meterd.status())) >= 2, 2 * EVERY + 6,
                        "two live rounds after the restart")
            final = meterd.wait(lambda: settled(meterd.status(), EVERY), 15, "the sink caught up, no round running")
            assert final["journal"]["write_errors"] == 0 and final["sinks"]["influx"]["dropped_lines"] == 0
            assert meterd.terminate() == 0, meterd.log_tail()

    journal = meterd.all_readings(ADDRESSES)
    readings = [r for rs in journal.values() for r in rs]
    expected = journal_points(readings)  # fails on a duplicate (meter, quantity, time)

    # the journal saw every phase: rounds while influxd was down, part of each killed round, rounds after them
    assert {r["meter"] for r in readings if not r["frozen"]} == set(ADDRESSES)
    assert any(down <= r["collected"] <= up for r in readings), "nothing was collected while influxd was down"
    for killed, killed_at in kills:
        done = {r["meter"] for r in readings if killed["started"] <= r["time"] <= killed_at and not r["frozen"]}
        assert killed["done"] <= len(done) < len(ADDRESSES), (killed, sorted(done))
    frozen = Counter(r["meter"] for r in readings if r["frozen"])
    assert frozen == dict.fromkeys(ADDRESSES, len(ENERGY)), frozen  # read every round, stored once

    # influxd: every journal point, exactly once per (series, timestamp), and nothing that is not in the journal
    in_influx = influx_points(influxdb, station, MEASUREMENTS, station)
    assert in_influx == expected, f"InfluxDB vs journal: {diff(expected, in_influx)}"
    counts = influxdb.query(f"SELECT COUNT(forward_active_energy) FROM energy WHERE \"station\" = '{station}' "
                            "GROUP BY \"meter\", \"frozen\"", db=station)["results"][0]["series"]
    per_series = {(s["tags"]["meter"], s["tags"]["frozen"] == "true"): s["values"][0][1] for s in counts}
    distinct = Counter((r["meter"], r["frozen"]) for r in readings if r["quantity"] == "forward_active_energy")
    assert per_series == dict(distinct), {k: (distinct.get(k), per_series.get(k)) for k in {*distinct, *per_series}
                                          if distinct.get(k) != per_series.get(k)}
