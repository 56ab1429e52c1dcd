"""A clean stop (SIGTERM) lets each sink send its backlog first (`drain_on_stop`), and without the drain
what was left is still in the journal and goes out on the next start.

Real processes: `metersim serve` (5 meters behind a TCP serial server), `meterd run` (a 2 s plan, an
InfluxDB 1.x sink that idles 30 s once caught up, so only the drain can send the last rounds) and influxd.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemon_harness import Meterd, Metersim, diff, influx_points, journal_points, processes
from tests.server_process import free_tcp_port
from tests.services import InfluxDB

pytestmark = pytest.mark.integration

ADDRESSES = [f"{3001 + i:012d}" for i in range(5)]
MEASUREMENTS = {"voltage_a": "voltage"}


def fleet() -> dict[str, Any]:
    return {"seed": 9, "api": {"listen": "127.0.0.1:0"}, "buses": [
        {"name": "server", "tcp": "127.0.0.1:0", "baud": 9600, "reply_delay_ms": [5, 10], "meters": 5,
         "first_address": ADDRESSES[0]}]}


def config(tmp_path: Path, station: str, port: int, influx: InfluxDB, drain: float) -> dict[str, Any]:
    return {
        "station": {"name": station, "state_dir": str(tmp_path / "state")},
        "api": {"listen": f"127.0.0.1:{free_tcp_port()}"},
        "links": [{"name": "server", "kind": "tcp", "host": "127.0.0.1", "port": port}],
        "meters": [{"address": a, "link": "server"} for a in ADDRESSES],
        "plans": [{"name": "live", "items": ["voltage_a"], "every": "2s"}],
        "sinks": [{"name": "influx", "kind": "influxdb", "api": "v1", "url": influx.url, "database": station,
                   "flush_interval": 30.0, "drain_on_stop": drain}],
    }


def stop_with_a_backlog(meterd: Meterd) -> None:
    """Start, wait for two rounds in the journal while the sink idles (it found nothing at its start and
    pauses 30 s), then SIGTERM."""
    meterd.start()
    meterd.wait(lambda: meterd.status()["journal"]["appended"] >= 2 * len(ADDRESSES), 10, "two rounds in the journal")
    assert meterd.status()["sinks"]["influx"]["sent_lines"] == 0  # idle: those rounds wait for the sink
    assert meterd.terminate() == 0, meterd.log_tail()


def test_sigterm_drains_the_sinks_and_without_a_drain_the_rest_waits_in_the_journal(
        tmp_path: Path, influxdb: InfluxDB) -> None:
    metersim = Metersim(tmp_path / "metersim", fleet())
    with processes(metersim):
        metersim.start()
        port = metersim.buses["server"].port
        results: dict[float, tuple[Any, Any]] = {}
        for drain in (5.0, 0.0):
            station = f"stop_{uuid.uuid4().hex[:8]}"
            influxdb.create_database(station)
            meterd = Meterd(tmp_path / f"meterd-{drain:g}", config(tmp_path / f"d{drain:g}", station, port,
                                                                   influxdb, drain))
            with processes(meterd):
                stop_with_a_backlog(meterd)
                expected = journal_points(r for rs in meterd.all_readings(ADDRESSES).values() for r in rs)
                results[drain] = (expected, influx_points(influxdb, station, MEASUREMENTS, station))
                if drain == 0.0:  # the next start sends what the stop left behind
                    meterd.start()
                    meterd.wait(lambda db=station, e=expected: set(e) <= set(
                        influx_points(influxdb, db, MEASUREMENTS, db)), 15, "what the stop left, sent at the restart")
                    assert meterd.terminate() == 0

    expected, in_influx = results[5.0]
    assert in_influx == expected, f"drained stop: InfluxDB vs journal: {diff(expected, in_influx)}"
    expected, in_influx = results[0.0]
    assert in_influx == {} and expected, "with no drain the rounds should still have been waiting in the journal"
