"""meterd end to end: a metersim fleet on every link kind, collected on schedule into the journal, InfluxDB 1.x
(`/write`) and VictoriaMetrics (`/api/v2/write`), with the right values, units and timestamps.

Real processes and servers only: `metersim serve` with a bus on a pty, a TCP serial server, a DTU that dials
meterd's `tcp-listen` link and registers, and an MQTT bus on Mosquitto; `meterd run` with an every-5-s plan of
live values and a daily-freeze plan; influxd and VictoriaMetrics from tests/services.py.

Oracles: the simulator's API before and after the rounds bounds the live energy registers (they only grow), a twin
of the fleet built in this process from the same fleet file answers what each meter froze at midnight and what it
measured around the moment of each read, and the simulator's ground truth counts the replies it delivered.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from prometheus_client.parser import text_string_to_metric_families

from protocols.dlt645 import decode, find, parse, read_request
from simulators.fleet import build
from simulators.fleet import parse as parse_fleet
from tests.integration.daemon_harness import (
    Meterd,
    Metersim,
    diff,
    influx_points,
    journal_points,
    processes,
    settled,
    vm_points,
)
from tests.server_process import free_tcp_ports
from tests.services import InfluxDB, Mosquitto, VictoriaMetrics

pytestmark = pytest.mark.integration

TZ = ZoneInfo("Asia/Shanghai")  # the station's timezone; the meters' clocks are UTC+8 too
EVERY = 5.0  # s, the live plan
ENERGY = ["forward_active_energy", *(f"forward_active_energy_t{k}" for k in range(1, 5))]
LIVE = [*ENERGY, "voltage_a", "current_a", "frequency", "status_word_3"]
UNITS = {**dict.fromkeys(ENERGY, "kWh"), "voltage_a": "V", "current_a": "A", "frequency": "Hz", "status_word_3": ""}
MEASUREMENTS = {**dict.fromkeys(ENERGY, "energy"), "voltage_a": "voltage", "current_a": "current",
                "frequency": "frequency", "status_word_3": "status"}
# bus name in metersim -> (meterd link, first address); three meters on each
BUSES = {"line": ("rs485", 1101), "server": ("serial-server", 1201), "dtu": ("dtus", 1301), "mqtt": ("mqtt", 1401)}
ADDRESSES = {f"{first + i:012d}": link for link, first in BUSES.values() for i in range(3)}


def fleet_for(tmp_path: Path, tcp_port: int, dtu_port: int, broker: str, topic: str) -> dict[str, Any]:
    wire = {"baud": 9600, "reply_delay_ms": [5, 20], "meters": 3}
    return {
        "seed": 11, "timezone_offset_h": 8, "api": {"listen": "127.0.0.1:0"},
        "buses": [
            {"name": "line", "pty": str(tmp_path / "rs485"), "first_address": f"{1101:012d}", **wire},
            {"name": "server", "tcp": f"127.0.0.1:{tcp_port}", "first_address": f"{1201:012d}", **wire},
            {"name": "dtu", "dtu": {"host": "127.0.0.1", "port": dtu_port, "registration": "DTU01",
                                    "register_mode": "once", "heartbeat": "HB", "heartbeat_s": 1.0},
             "first_address": f"{1301:012d}", **wire},
            {"name": "mqtt", "mqtt": {"url": broker, "request_topic": f"{topic}/request",
                                      "response_topic": f"{topic}/response", "encoding": "hex"},
             "first_address": f"{1401:012d}", **wire},
        ],
    }


def config_for(tmp_path: Path, station: str, api_port: int, tcp_port: int, dtu_port: int, broker: str, topic: str,
               influx: InfluxDB, vm: VictoriaMetrics) -> dict[str, Any]:
    fast = {"reconnect_min": 0.1, "reconnect_max": 1.0}
    sink = {"flush_interval": 0.2, "retry_initial": 0.2, "retry_max": 1.0}
    return {
        "station": {"name": station, "timezone": "Asia/Shanghai", "state_dir": str(tmp_path / "state")},
        "api": {"listen": f"127.0.0.1:{api_port}"},
        "links": [
            {"name": "rs485", "kind": "serial", "port": str(tmp_path / "rs485"), "baud": 9600, "parity": "E", **fast},
            {"name": "serial-server", "kind": "tcp", "host": "127.0.0.1", "port": tcp_port, **fast},
            {"name": "dtus", "kind": "tcp-listen", "listen": f"127.0.0.1:{dtu_port}", "identify": "registration",
             "registration": {"match": "text:DTU01", "mode": "once"}, "heartbeat": "text:HB", **fast},
            {"name": "mqtt", "kind": "mqtt", "url": broker, "request_topic": f"{topic}/request",
             "response_topic": f"{topic}/response", "encoding": "hex", **fast},
        ],
        "meters": [{"address": a, "link": link, **({"peer": "DTU01"} if link == "dtus" else {})}
                   for a, link in ADDRESSES.items()],
        "plans": [
            {"name": "live", "items": ["forward_active_energy_block", "voltage_a", "current_a", "frequency",
                                       "status_word_3"], "every": "5s"},
            {"name": "freeze", "items": ["daily_freeze_forward_active_energy_last1"], "every": "10s"},
        ],
        "sinks": [
            {"name": "influx1", "kind": "influxdb", "api": "v1", "url": influx.url, "database": station, **sink},
            {"name": "vm", "kind": "influxdb", "api": "v2", "url": vm.url, "org": "meterd", "bucket": "meters",
             "token": "unused", **sink},
        ],
    }


class Twin:
    """The fleet rebuilt in this process from the same fleet file: what a meter answers at a given moment."""

    def __init__(self, fleet: dict[str, Any]) -> None:
        self.fleet = build(parse_fleet(fleet), now=time.time())

    def value(self, address: str, item: str, at: float) -> dict[str, Any]:
        located = self.fleet.locate(address)
        assert located is not None
        (reply,) = located[0].answer(parse(read_request(address, find(item, 2007).di)), at)
        return {name: q.value for name, q in decode(parse(reply)).values.items()}

    def around(self, address: str, item: str, t: float, before: float = 2.0) -> set[Any]:
        """Every value the meter gave for `item` in [t - before, t], sampled every 10 ms."""
        return {self.value(address, item, t - k * 0.01)[item] for k in range(int(before * 100) + 1)}


def start_gated() -> None:
    """Start right after a 5 s mark, so the first round is >= 4.5 s away: every link is up by then (the DTU and
    the TCP link within ~1 s), and no round fails for a link that was still coming up."""
    phase = time.time() % EVERY
    if phase > 0.5:
        time.sleep(EVERY - phase + 0.02)


def metric(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(s.labels.items())): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == name}


def test_fleet_on_every_link_kind_is_collected_into_journal_influxdb_and_victoriametrics(
        tmp_path: Path, mosquitto: Mosquitto, influxdb: InfluxDB, victoriametrics: VictoriaMetrics,
        unique_topic: str) -> None:
    station = f"e2e_{uuid.uuid4().hex[:8]}"
    influxdb.create_database(station)
    api_port, tcp_port, dtu_port = free_tcp_ports(3)
    broker = f"mqtt://{mosquitto.host}:{mosquitto.port}"
    fleet = fleet_for(tmp_path, tcp_port, dtu_port, broker, unique_topic)
    meterd = Meterd(tmp_path / "meterd", config_for(tmp_path, station, api_port, tcp_port, dtu_port, broker,
                                                    unique_topic, influxdb, victoriametrics))
    metersim = Metersim(tmp_path / "metersim", fleet)
    twin = Twin(fleet)  # built when the simulator's fleet is: the same history, the same midnight
    with processes(metersim, meterd):
        start_gated()
        meterd.start()  # first: the DTU finds meterd listening when it dials; the other links reconnect fast
        metersim.start()
        assert set(metersim.meters()) == set(ADDRESSES)
        before = {a: metersim.meter(a) for a in ADDRESSES}
        snapshot_done = time.time()
        meterd.wait(lambda: meterd.healthz()[1]["checks"]["links"]["up"] == 4, 10, "the 4 links (1 DTU) up")

        meterd.wait(lambda: all((meterd.status()["plans"].get(p) or {}).get("last") for p in ("live", "freeze")),
                    25, "a finished round of both plans")
        final = meterd.wait(lambda: settled(meterd.status(), EVERY), 15, "sinks caught up, no round running")
        health_code, health = meterd.healthz()
        metrics = meterd.metrics()
        assert meterd.terminate() == 0, meterd.log_tail()
        after = {a: metersim.meter(a) for a in ADDRESSES}
        assert metersim.stop() == 0
    journal = meterd.all_readings(ADDRESSES)
    first = next(iter(ADDRESSES))
    assert meterd.readings_command(first) == journal[first]  # the installed command says the same

    # -- rounds: on schedule, every meter collected in each, after the simulator's "before" snapshot ----------------
    rounds = {plan: final["plans"][plan]["history"] for plan in ("live", "freeze")}
    for plan, history in rounds.items():
        assert history, plan
        for r in history:
            assert (r["expected"], r["collected"], r["failed"], r["skipped"]) == (12, 12, {}, 0), (plan, r)
            assert r["started"] > snapshot_done, "a round started before the test's snapshot"
            period = 5 if plan == "live" else 10
            assert r["started"] % period < 0.5, f"{plan} round at {r['started']} is not on its {period} s mark"
    assert final["plans"]["live"]["rounds_total"] == len(rounds["live"])
    midnight = dt.datetime.combine(dt.datetime.fromtimestamp(rounds["freeze"][0]["started"], TZ).date(),
                                   dt.time(0), TZ).timestamp()

    # -- the journal: every meter, every quantity of every round, right values, units and timestamps ----------------
    for address, link in ADDRESSES.items():
        readings = journal[address]
        assert readings, f"meter {address} ({link}) is not in the journal"
        for r in readings:
            assert (r["station"], r["quality"], r["unit"]) == (station, "good", UNITS[r["quantity"]]), r
            assert r["link"] == link or r["link"].startswith(f"{link}/"), r
        live = [r for r in readings if not r["frozen"]]
        frozen = [r for r in readings if r["frozen"]]
        assert {r["plan"] for r in live} == {"live"} and {r["plan"] for r in frozen} == {"freeze"}

        # live values: each round's window holds each quantity once; nothing outside the rounds
        for r in rounds["live"]:
            inside = sorted(x["quantity"] for x in live if r["started"] <= x["time"] <= r["finished"])
            assert inside == sorted(LIVE), (address, r["round_id"], inside)
        assert len(live) == len(LIVE) * len(rounds["live"]), address
        for x in live:
            q, v = x["quantity"], x["value"]
            if q in ENERGY:  # registers only grow: between the simulator's snapshots before and after
                assert before[address]["registers"][q] <= v <= after[address]["registers"][q], (address, q, v)
            elif q == "status_word_3":
                assert v == before[address]["status_word_3"] == after[address]["status_word_3"], (address, v)
            else:  # what the meter measured in the moments before the reading was stamped
                assert v in twin.around(address, q, x["time"]), (address, q, v, x["time"])

        # the daily freeze: stamped with the freeze time (local midnight), the meter's frozen registers exactly,
        # stored once however often it is read
        frozen_now = twin.value(address, "daily_freeze_forward_active_energy_last1", midnight + 3600)
        assert sorted(x["quantity"] for x in frozen) == sorted(ENERGY), address
        for x in frozen:
            assert x["time"] == midnight, (address, x)
            assert x["value"] == frozen_now[x["quantity"]], (address, x, frozen_now)
    expected = journal_points(r for readings in journal.values() for r in readings)

    # -- the same points in InfluxDB 1.x (/write) and VictoriaMetrics (/api/v2/write) -------------------------------
    in_influx = influx_points(influxdb, station, MEASUREMENTS, station)
    assert in_influx == expected, f"InfluxDB vs journal: {diff(expected, in_influx)}"
    in_vm = vm_points(victoriametrics, MEASUREMENTS, station)
    assert in_vm == expected, f"VictoriaMetrics vs journal: {diff(expected, in_vm)}"
    types = {row[0]: row[1] for s in influxdb.query("SHOW FIELD KEYS FROM energy, status", db=station)["results"][0]
             ["series"] for row in s["values"]}
    assert types == {**dict.fromkeys(ENERGY, "float"), "status_word_3": "integer"}
    # one `collection` point per round, at the round's start, with its statistics
    (series,) = influxdb.query("SELECT * FROM collection", db=station)["results"][0]["series"]
    logged = {row["round_id"]: row for row in (dict(zip(series["columns"], v, strict=True)) for v in series["values"])}
    for plan, history in rounds.items():
        for r in history:
            got = logged[r["round_id"]]
            assert (got["plan"], got["expected"], got["collected"], got["success_ratio"]) == (plan, 12, 12, 1.0), got
            assert dt.datetime.fromisoformat(got["time"].replace("Z", "+00:00")).timestamp() == int(r["started"])

    # -- what ops see ------------------------------------------------------------------------------------------------
    assert health_code == 200 and health["status"] == "ok", health
    links = {name: state["up"] for name, state in final["links"].items()}
    assert links == dict.fromkeys(["rs485", "serial-server", "dtus", "dtus/DTU01", "mqtt"], True), final["links"]
    # a clean run warns about nothing but the links that were not there yet when meterd started before metersim
    noise = [line for line in meterd.log().splitlines()
             if (" WARNING " in line or " ERROR " in line) and "cannot connect" not in line]
    assert noise == [], noise
    ratios = metric(metrics, "meterd_collection_plan_success_ratio")
    assert ratios == {(("plan", "freeze"),): 1.0, (("plan", "live"),): 1.0}, ratios
    assert set(metric(metrics, "meterd_sink_backlog").values()) == {0.0}
    sent = metric(metrics, "meterd_sink_sent_total")
    assert len(sent) == 2 and all(v > 0 for v in sent.values()), sent

    # -- the simulator delivered exactly the replies those rounds needed: nothing collected twice, nothing wasted ----
    truth = metersim.truth()
    per_meter = 5 * len(rounds["live"]) + 2 * len(rounds["freeze"])  # 5 items; freeze time + frozen block
    delivered = {a: truth["meters"][a]["delivered"] for a in ADDRESSES}
    assert delivered == dict.fromkeys(ADDRESSES, per_meter), delivered
    assert truth["buses"]["dtu"].get("dtu_connects") == 1, truth["buses"]["dtu"]
