"""The HTTP API against a running fleet (real TCP exposure, real HTTP server, DL/T 645 reads), and `metersim serve`."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import os
import signal
import socket
import sys
import time
import tomllib
from contextlib import asynccontextmanager

import aiohttp
import pytest

from protocols.dlt645 import Action, Auth, BadChecksum, RelayStatus, control_request, read_request
from simulators.cli import main
from simulators.fleet import build, parse
from simulators.serve import Running
from tests.simulators.client import Client

FLEET = """
[api]
listen = "127.0.0.1:0"

[[buses]]
name = "b1"
tcp = "127.0.0.1:0"
baud = 0
meters = 3

[[buses]]
name = "b2"
tcp = "127.0.0.1:0"
baud = 0
meters = 2
first_address = "000000000011"
"""
M1, M2, M3, M11 = "000000000001", "000000000002", "000000000003", "000000000011"
ENERGY, POWER, DATE, TIME, STATUS3 = 0x00010000, 0x02030000, 0x04000101, 0x04000102, 0x04000503


class Rig:
    def __init__(self, running: Running, http: aiohttp.ClientSession, skew: list[float]) -> None:
        self.running = running
        self.fleet = running.fleet
        self.http = http
        self.skew = skew
        self.clients: dict[str, Client] = {}

    async def line(self, bus: str) -> Client:
        if bus not in self.clients:
            exposure = self.running.exposures[[b.name for b in self.fleet.buses].index(bus)]
            self.clients[bus] = await Client.tcp("127.0.0.1", exposure.port)
        return self.clients[bus]

    async def read(self, address: str, di: int = ENERGY, timeout: float = 1.0):
        bus = self.fleet.locate(address)[1].name
        reply = await (await self.line(bus)).ask(read_request(address, di), timeout=timeout)
        return None if reply is None else reply.values[next(iter(reply.values))].value

    async def call(self, method: str, path: str, body: object = None, *, raw: str | None = None):
        data = raw if raw is not None else (None if body is None else json.dumps(body))
        async with self.http.request(method, self.running.api_url + path, data=data) as response:
            return response.status, await response.json()


@asynccontextmanager
async def rig_for(text: str = FLEET):
    skew = [0.0]

    def clock() -> float:
        return time.time() + skew[0]

    fleet = build(parse(tomllib.loads(text)), clock=clock)
    running = Running(fleet, clock=clock)
    await running.start(io.StringIO())
    async with aiohttp.ClientSession() as http:
        rig = Rig(running, http, skew)
        try:
            yield rig
        finally:
            for client in rig.clients.values():
                await client.close()
            await running.close()


@pytest.fixture
async def rig():
    async with rig_for() as r:
        yield r


async def test_meters_list_state_and_errors(rig):
    status, meters = await rig.call("GET", "/meters")
    assert status == 200 and meters[0] == {"address": M1, "bus": "b1", "edition": 2007}
    assert [m["address"] for m in meters] == [M1, M2, M3, M11, "000000000012"]
    assert [m["address"] for m in (await rig.call("GET", "/meters?bus=b2"))[1]] == [M11, "000000000012"]
    status, state = await rig.call("GET", f"/meters/{M1}")
    assert status == 200 and (state["bus"], state["faults"], state["relay"]["open"]) == ("b1", [], False)
    assert state["registers"]["forward_active_energy"] > 0
    assert await rig.call("GET", "/meters/12x") == (
        400, {"error": "bad address: a meter address is 12 decimal digits, got '12x'"})
    assert await rig.call("GET", "/meters/000000000099") == (404, {"error": "no meter 000000000099 in this fleet"})
    assert await rig.call("GET", "/nowhere") == (404, {"error": "GET /nowhere: Not Found"})
    assert await rig.call("DELETE", "/faults") == (405, {"error": "DELETE /faults: Method Not Allowed"})


async def test_load_is_what_the_meter_then_measures(rig):
    status, state = await rig.call("PUT", f"/meters/{M1}/load", {"kw": 3.25})
    assert status == 200 and state["load_override_kw"] == 3.25
    assert await rig.read(M1, POWER) == 3.25
    await rig.call("PUT", f"/meters/{M1}/load", {"kw": None})
    assert await rig.read(M1, POWER) == pytest.approx(rig.fleet.locate(M1)[0].load_kw(
        rig.fleet.locate(M1)[0].real_local(time.time())), abs=1e-3)
    for body, raw, error in (
            (None, "{nope", "the body is not valid JSON: "),
            (["kw"], None, "the body must be a JSON object"),
            ({}, None, "'kw' is required"),
            ({"kw": "2"}, None, "'kw' must be a finite number or null, got '2'"),
            ({"kw": True}, None, "'kw' must be a finite number or null, got True"),
            ({"kw": -1}, None, "'kw' must be >= 0, got -1.0")):
        status, reply = await rig.call("PUT", f"/meters/{M1}/load", body, raw=raw)
        assert status == 400 and reply["error"].startswith(error)


async def test_clock_offset_is_what_the_meter_then_reads(rig):
    rig.skew[0] = 86400.0  # the injected time: a day later for the API and the buses alike
    status, state = await rig.call("PUT", f"/meters/{M2}/clock", {"offset_s": -7200})
    assert status == 200 and state["clock_offset_s"] == pytest.approx(-7200, abs=1)
    date, clock = await rig.read(M2, DATE), await rig.read(M2, TIME)
    expected = dt.datetime.fromtimestamp(time.time() + 86400 + 8 * 3600 - 7200, dt.UTC).replace(tzinfo=None)
    assert abs((dt.datetime.combine(date, clock) - expected).total_seconds()) < 3
    assert (await rig.call("PUT", f"/meters/{M2}/clock", {"offset_s": "1h"}))[0] == 400


async def test_trip_allow_close_then_the_button_closes_the_relay(rig):
    line = await rig.line("b1")
    meter = rig.fleet.locate(M3)[0]

    async def status() -> RelayStatus:
        return RelayStatus.from_word(await rig.read(M3, STATUS3))

    async def control(action: Action) -> None:
        deadline = meter.clock_datetime(time.time()) + dt.timedelta(minutes=5)
        reply = await line.ask(control_request(M3, action, deadline, auth=Auth(2)))
        assert reply is not None and reply.ok

    assert (await rig.call("POST", f"/meters/{M3}/button"))[1]["closed"] is False  # nothing to close
    await control(Action.TRIP)
    assert (await status()).relay_open and (await rig.read(M3, POWER)) == 0
    await control(Action.ALLOW_CLOSE)
    assert (await status()) == RelayStatus(relay_open=True, trip_commanded=False, pre_trip_alarm=False, hold=False)
    status_code, state = await rig.call("POST", f"/meters/{M3}/button")
    assert status_code == 200 and state["closed"] is True and state["relay"]["open"] is False
    assert not (await status()).relay_open
    truth = (await rig.call("GET", "/truth"))[1]["meters"][M3]
    assert truth["control_accepted"] == 2 and truth["relay"]["open"] is False


async def test_kill_and_revive(rig):
    status, state = await rig.call("POST", f"/meters/{M2}/kill")
    await rig.call("POST", f"/meters/{M2}/kill")  # twice is still one rule
    assert status == 200 and [f["kind"] for f in state["faults"]] == ["dead"]
    assert len((await rig.call("GET", "/faults"))[1]["faults"]) == 1
    assert await rig.read(M2, timeout=0.3) is None
    assert await rig.read(M1) is not None
    status, state = await rig.call("POST", f"/meters/{M2}/revive")
    assert status == 200 and state["faults"] == []
    assert await rig.read(M2) is not None
    truth = (await rig.call("GET", "/truth"))[1]
    assert truth["meters"][M2]["fault_dead"] == 1 and truth["meters"][M2]["delivered"] == 1
    assert (await rig.call("POST", "/meters/000000000077/kill"))[0] == 404


async def test_fault_scopes_replace_rules_and_take_effect(rig):
    status, body = await rig.call("PUT", "/faults", {"scope": "bus", "bus": "b2", "faults": [{"kind": "corrupt"}]})
    assert status == 200 and [(f["kind"], f["bus"]) for f in body["faults"]] == [("corrupt", "b2")]
    assert await rig.read(M11, timeout=0.3) is None
    assert any(isinstance(e, BadChecksum) for e in (await rig.line("b2")).errors)
    assert await rig.read(M1) is not None
    await rig.call("PUT", "/faults", {"scope": "meter", "meter": M1, "faults": [{"kind": "no_reply", "for_s": 100}]})
    assert await rig.read(M1, timeout=0.3) is None and await rig.read(M2) is not None
    state = (await rig.call("GET", f"/meters/{M1}"))[1]
    assert [(f["kind"], f["meter"]) for f in state["faults"]] == [("no_reply", M1)]
    rig.skew[0] = 200.0  # past the rule's window
    assert await rig.read(M1) is not None
    status, body = await rig.call("PUT", "/faults", {"scope": "bus", "bus": "b2", "faults": []})
    assert [f["kind"] for f in body["faults"]] == ["no_reply"]
    assert await rig.read(M11) is not None
    await rig.call("PUT", "/faults", {"scope": "fleet", "faults": [{"kind": "no_reply", "every": 2}]})
    assert [await rig.read(M3, timeout=0.3) is not None for _ in range(4)] == [True, False, True, False]
    for body, code, error in (
            ({"scope": "fleet", "faults": [{"kind": "zap"}]}, 400,
             "faults[0].kind: unknown fault kind 'zap'; known: corrupt, dead, echo, garbage, late_reply, link_drop, "
             "no_reply, relay_stuck, truncated"),
            ({"scope": "fleet", "faults": [{"kind": "no_reply", "probability": 3}]}, 400,
             "faults[0].probability: Input should be less than or equal to 1, got 3"),
            ({"scope": "fleet", "faults": [{"kind": "no_reply", "chance": 1}]}, 400, "faults[0].chance: unknown key"),
            ({"scope": "galaxy", "faults": []}, 400, "'scope' must be 'fleet', 'bus' or 'meter', got 'galaxy'"),
            ({"scope": "bus", "bus": "b9", "faults": []}, 404, "scope 'bus' needs an existing 'bus', got 'b9'"),
            ({"scope": "meter", "meter": "123", "faults": []}, 400,
             "scope 'meter': bad 'meter': a meter address is 12 decimal digits, got '123'"),
            ({"scope": "meter", "meter": M1, "faults": [{"kind": "dead", "meter": M2}]}, 400,
             "faults[0].meter: must match the scope ('000000000001') or be left out"),
            ({"scope": "fleet"}, 400, "'faults' must be a list of rules (an empty list clears the scope)")):
        assert await rig.call("PUT", "/faults", body) == (code, {"error": error})
    assert [f["kind"] for f in (await rig.call("GET", "/faults"))[1]["faults"]] == ["no_reply", "no_reply"]


async def test_truth_counts_what_really_happened(rig):
    assert await rig.read(M3) is not None
    await rig.call("PUT", "/faults", {"scope": "meter", "meter": M3, "faults": [{"kind": "no_reply"}]})
    assert await rig.read(M3, timeout=0.3) is None
    status, truth = await rig.call("GET", "/truth")
    assert status == 200
    assert truth["meters"][M3] == {"bus": "b1", "received": 2, "answered": 2, "delivered": 1, "fault_no_reply": 1,
                                   "relay": {"open": False, "trip_command": False, "hold": False, "alarm": False}}
    assert truth["meters"][M1] == {"bus": "b1", "received": 0, "answered": 0, "delivered": 0,
                                   "relay": {"open": False, "trip_command": False, "hold": False, "alarm": False}}
    assert truth["buses"]["b1"] == {"meters": 3, "connections": 1, "requests": 2, "replies": 1, "fault_no_reply": 1}
    assert truth["totals"]["meter_delivered"] == 1
    only = (await rig.call("GET", "/truth?bus=b2"))[1]
    assert list(only["buses"]) == ["b2"] and list(only["meters"]) == [M11, "000000000012"]
    assert await rig.call("GET", "/truth?bus=zz") == (404, {"error": "no bus named 'zz'"})


async def test_metersim_serve_end_to_end(tmp_path):
    truth_file = tmp_path / "truth.json"
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "simulators.cli", "serve", "--tcp", "127.0.0.1:0", "--meters", "5",
        "--api", "127.0.0.1:0", "--truth", str(truth_file), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env)
    assert proc.stdout is not None
    try:
        lines = []
        while not lines or lines[-1] != "ready":
            line = await asyncio.wait_for(proc.stdout.readline(), 15)
            assert line, (await proc.stderr.read()).decode()
            lines.append(line.decode().strip())
        bus, kind, where, count = lines[0].split(" ", 3)
        assert (bus, kind, count) == ("bus1", "tcp", "(5 meters)") and lines[1].startswith("api http://127.0.0.1:")
        client = await Client.tcp("127.0.0.1", int(where.rsplit(":", 1)[1]))
        reply = await client.ask(read_request("000000000004", ENERGY))
        await client.close()
        assert reply is not None and reply.values["forward_active_energy"].value > 0
        async with aiohttp.ClientSession() as http, http.get(lines[1].split()[1] + "/meters/000000000004") as r:
            state = await r.json()
        assert state["truth"] == {"received": 1, "answered": 1, "delivered": 1}
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 15)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()
    assert out.decode() == ("truth: 5 meters on 1 bus: 1 requests, 1 answered, 1 delivered, 0 faults injected; "
                            f"written to {truth_file}\n")
    truth = json.loads(truth_file.read_text())
    assert truth["meters"]["000000000004"]["delivered"] == 1 and len(truth["meters"]) == 5
    assert truth["buses"]["bus1"]["requests"] == 1


def test_serve_exits_1_when_the_port_is_taken(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--tcp", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"metersim: bus bus1: cannot open tcp 127.0.0.1:{port}: ") and "Traceback" not in err
