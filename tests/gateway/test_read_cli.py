"""`meterd read` and POST /api/v1/read against metersim over real TCP and a real pty. The CLI runs its own
event loop, so it runs in a thread while the meters (and for the daemon path a real ApiServer + Bus) run here."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from zoneinfo import ZoneInfo

import aiohttp
import pytest

from gateway import read_cli
from gateway.api import ApiConfig, ApiServer
from gateway.api_read import read_routes
from gateway.archive import MeterConfig
from gateway.bus import Bus, Priority, Timing
from gateway.config import Config, load_config
from gateway.links import TcpLink, parse_link
from gateway.reader import Dlt645Reader
from gateway.stats import CollectionStats
from protocols.dlt645 import read_request
from simulators.bus import Bus as SimBus
from simulators.bus import Wire
from simulators.meter import Meter
from simulators.pty import serve_pty
from simulators.tcp import serve_tcp
from tests.server_process import free_tcp_port

TZ = ZoneInfo("Asia/Shanghai")
TOKEN = "field-token"
M1, M2, OLD = "000000000001", "000000000002", "000000000003"


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="meterd")
    read_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["read", *argv])
    code: int = args.handler(args)
    return code


async def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(cli, *argv)
    out, err = capsys.readouterr()
    return code, out, err


@dataclass
class Sim:
    bus: SimBus
    meters: dict[str, Meter]
    port: int

    def energy(self, address: str) -> float:
        return float(self.meters[address].state(time.time())["registers"]["forward_active_energy"])


@contextlib.asynccontextmanager
async def simulated(baud: int = 9600) -> AsyncIterator[Sim]:
    now = time.time()
    meters = {a: Meter(a, edition=1997 if a == OLD else 2007, epoch=now - 70 * 86400, now=now) for a in (M1, M2, OLD)}
    bus = SimBus("bus1", meters.values(), Wire(baud=baud, delay_min=0.02, delay_max=0.05))
    exposure = await serve_tcp(bus, "127.0.0.1", 0)
    try:
        yield Sim(bus, meters, exposure.port)
    finally:
        await exposure.close()
        await bus.close()


def write_config(tmp_path: Path, sim_port: int, api_port: int, token: str = TOKEN) -> Path:
    path = tmp_path / "meterd.toml"
    path.write_text(f"""
[station]
name = "st-01"
state_dir = "{tmp_path / 'state'}"
[api]
listen = "127.0.0.1:{api_port}"
token = "{token}"
[[links]]
kind = "tcp"
name = "bus1"
host = "127.0.0.1"
port = {sim_port}
first_byte_timeout = 0.5
[[meters]]
address = "{M1}"
link = "bus1"
[[meters]]
address = "{OLD}"
link = "bus1"
edition = 1997
""")
    return path


@contextlib.asynccontextmanager
async def mini_daemon(config: Config, api_port: int) -> AsyncIterator[Bus]:
    """What meterd run wires for this route: the link, its bus, the reader and the API with read_routes."""
    link = TcpLink("bus1", "127.0.0.1", config.links[0].port, reconnect_min=0.05)  # type: ignore[union-attr]
    bus = Bus(link, Timing(first_byte=0.5))
    reader = Dlt645Reader(config.station.name, config.tz, lambda m: bus.timing)
    api = ApiServer(ApiConfig(listen=f"127.0.0.1:{api_port}", token=TOKEN), CollectionStats("st-01", TZ),
                    journal_ok=lambda: True, links_up=lambda: 1)
    api.add_routes(read_routes(lambda: config, lambda m: bus if m.link == "bus1" else None, reader))
    stop = asyncio.Event()
    tasks = [asyncio.create_task(link.run(stop)), asyncio.create_task(bus.run(stop))]
    await api.start()
    try:
        assert await link.wait_up(3.0)
        yield bus
    finally:
        await api.stop()
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5.0)


# --- direct reads (--url) --------------------------------------------------------------------------

async def test_url_read_prints_values_and_freeze_times(capsys):
    async with simulated() as sim:
        code, out, err = await run_cli(capsys, "--url", f"tcp://127.0.0.1:{sim.port}", M1,
                                       "forward_active_energy", "voltage_a", "05060101")
        assert code == 0, err
        assert "through the daemon" not in out and "direct" in out
        line = next(row for row in out.splitlines() if "forward_active_energy " in row)
        assert float(line.split("│")[2]) == pytest.approx(sim.energy(M1), abs=0.02)
        assert "voltage_a" in out and " V " in out
        assert "00:00:00+08:00" in out  # the daily freeze is stamped with its freeze time (the meter's midnight)


async def test_url_read_json_block_and_dis_in_hex(capsys):
    async with simulated() as sim:
        code, out, _ = await run_cli(capsys, "--url", f"tcp://127.0.0.1:{sim.port}?preamble=0", M2,
                                     "0001FF00", "--json")
        assert code == 0
        result = json.loads(out)
        assert result["via"] == "direct" and result["ok"] and result["address"] == M2
        (item,) = result["items"]
        assert item["name"] == "forward_active_energy_block" and item["di"] == "0001FF00"
        assert [v["quantity"] for v in item["values"]] == ["forward_active_energy"] + [
            f"forward_active_energy_t{t}" for t in range(1, 5)]
        assert not item["values"][0]["frozen"] and item["values"][0]["time_local"].endswith("+08:00")


async def test_abnormal_reply_and_no_reply_are_clear_and_exit_1(capsys):
    async with simulated() as sim:
        url = f"tcp://127.0.0.1:{sim.port}?retries=0&first_byte_timeout=0.3"
        code, out, err = await run_cli(capsys, "--url", url, M1, "04000499", "voltage_a")
        assert code == 1
        assert "04000499: no_data" in out and "voltage_a" in out  # the other item is still read
        assert "1 of 2 item(s) not read; 04000499: no_data" in err
        code, out, err = await run_cli(capsys, "--url", url, "000000000099", "voltage_a", "forward_active_energy",
                                       "--json")
        assert code == 1
        first, second = json.loads(out)["items"]
        assert first["reason"] == "no_reply" and "no reply from 000000000099 within 0.3 s" in first["error"]
        assert second["reason"] == "skipped"  # nobody answers: the next items are not asked
        assert "no reply" in err


async def test_1997_meter_over_a_serial_url_on_a_real_pty(capsys, tmp_path):
    now = time.time()
    meter = Meter(OLD, edition=1997, epoch=now - 70 * 86400, now=now)
    bus = SimBus("serial", [meter], Wire(baud=9600, delay_min=0.02, delay_max=0.03))
    exposure = await serve_pty(bus, str(tmp_path / "ttyMETER"))
    try:
        code, out, err = await run_cli(capsys, "--url", f"serial://{exposure.path}?baud=9600&parity=E", OLD,
                                       "forward_active_energy", "9010", "--edition", "1997", "--json")
        assert code == 0, err
        result = json.loads(out)
        assert result["edition"] == 1997 and [i["di"] for i in result["items"]] == ["9010", "9010"]
        values = [i["values"][0]["value"] for i in result["items"]]
        assert values[0] == pytest.approx(meter.state(time.time())["registers"]["forward_active_energy"], abs=0.02)
    finally:
        await exposure.close()
        await bus.close()


@pytest.mark.parametrize(("argv", "message"), [
    (("--url", "tcp://127.0.0.1", M1, "voltage_a"), "expected tcp://HOST:PORT"),
    (("--url", "udp://x:1", M1, "voltage_a"), "expected serial:///dev/... or tcp://HOST:PORT"),
    (("--url", "serial:///dev/ttyS0?baud=fast", M1, "voltage_a"), "baud"),
    (("--url", "serial:///dev/ttyS0?colour=red", M1, "voltage_a"), "colour"),
    (("--url", "tcp://127.0.0.1:1", "12345678901X", "voltage_a"), "address"),
    (("--url", "tcp://127.0.0.1:1", M1, "energy"), "energy"),
    (("--url", "tcp://127.0.0.1:1", M1, "00010000", "--edition", "1997"), "1997"),
    (("--link", "bus9", "--config", "/nonexistent/meterd.toml", M1, "voltage_a"), "cannot read"),
])
def test_usage_errors_exit_2(capsys, argv, message):
    assert cli(*argv) == 2
    assert message in capsys.readouterr().err


def test_url_settings_reach_the_link_config():
    serial = read_cli.link_from_url("serial:///dev/ttyUSB0?baud=1200&parity=N&preamble=0&first_byte_timeout=2")
    assert (serial.kind, serial.port, serial.baud, serial.parity, serial.preamble, serial.first_byte_timeout_s) == (
        "serial", "/dev/ttyUSB0", 1200, "N", 0, 2)
    tcp = read_cli.link_from_url("tcp://10.0.0.5:8899")
    assert (tcp.kind, tcp.host, tcp.port, tcp.first_byte_timeout_s) == ("tcp", "10.0.0.5", 8899, 1.0)
    assert read_cli.api_url("0.0.0.0:8645") == "http://127.0.0.1:8645"
    assert read_cli.api_url("[::]:8645") == "http://[::1]:8645"


# --- --link: through the running daemon, or directly when it is not running ------------------------

async def test_link_read_goes_through_the_running_daemon_ahead_of_routine_polls(capsys, tmp_path):
    api_port = free_tcp_port()
    async with simulated(baud=2400) as sim:
        path = write_config(tmp_path, sim.port, api_port)
        async with mini_daemon(load_config(path), api_port) as bus:
            polls = [asyncio.create_task(bus.transact(read_request(M2, 0x00010000), M2, priority=Priority.ROUTINE))
                     for _ in range(12)]  # a round's worth of queued routine polls (about 3 s at 2400 Bd)
            await asyncio.sleep(0.05)
            code, out, err = await run_cli(capsys, "--link", "bus1", "--config", str(path), M1,
                                           "forward_active_energy", "--json")
            assert code == 0, err
            assert sum(p.done() for p in polls) < 6  # the field read did not wait for the round
            result = json.loads(out)
            assert result["via"] == "daemon" and result["items"][0]["values"][0]["value"] == pytest.approx(
                sim.energy(M1), abs=0.02)
            code, out, err = await run_cli(capsys, "--link", "bus1", "--config", str(path), OLD, "time")
            assert code == 0 and "through the daemon" in out and "DL/T 645-1997" in out  # edition from the archive
            await asyncio.gather(*polls)
            assert sim.bus.truth["connections"] == 1  # the CLI never opened the port itself


async def test_link_read_opens_the_link_itself_when_no_daemon_runs(capsys, tmp_path):
    async with simulated() as sim:
        path = write_config(tmp_path, sim.port, free_tcp_port())
        code, out, err = await run_cli(capsys, "--link", "bus1", "--config", str(path), M1, "voltage_a", "--json")
        assert code == 0, err
        assert json.loads(out)["via"] == "direct"
        code, _, err = await run_cli(capsys, "--link", "nope", "--config", str(path), M1, "voltage_a")
        assert code == 2 and "no link 'nope'; links are bus1" in err


async def test_wrong_token_is_refused_and_nothing_is_read_directly(capsys, tmp_path):
    api_port = free_tcp_port()
    async with simulated() as sim:
        good = write_config(tmp_path, sim.port, api_port)
        async with mini_daemon(load_config(good), api_port):
            bad = write_config(tmp_path, sim.port, api_port, token="stale")
            code, _, err = await run_cli(capsys, "--link", "bus1", "--config", str(bad), M1, "voltage_a")
            assert code == 1 and "refused the token" in err
            assert sim.bus.truth["connections"] == 1


async def test_read_route_rejects_bad_requests(tmp_path):
    api_port = free_tcp_port()
    async with simulated() as sim:
        config = load_config(write_config(tmp_path, sim.port, api_port))
        async with mini_daemon(config, api_port), aiohttp.ClientSession(
                headers={"Authorization": f"Bearer {TOKEN}"}) as session:
            url = f"http://127.0.0.1:{api_port}/api/v1/read"
            cases = [
                ({"link": "bus1", "address": M1, "items": ["energy"]}, 400, "energy"),
                ({"link": "bus1", "address": "12AB", "items": ["voltage_a"]}, 400, "12 digits"),
                ({"link": "bus1", "address": M1, "items": []}, 400, "items"),
                ({"link": "bus1", "address": M1, "items": ["voltage_a"], "edition": 2013}, 400, "edition"),
                ({"link": "bus7", "address": M1, "items": ["voltage_a"]}, 404, "no link 'bus7'"),
            ]
            for body, status, text in cases:
                async with session.post(url, json=body) as response:
                    assert response.status == status, body
                    assert text in (await response.json())["error"]
            async with session.post(url, data=b"not json") as response:
                assert response.status == 400
            async with session.post(url, json={"link": "bus1", "address": M1, "items": ["voltage_a"]}) as response:
                assert response.status == 200 and (await response.json())["ok"]


async def test_a_link_without_a_bus_is_503_and_dtu_links_only_take_known_dtus(tmp_path):
    config = load_config(write_config(tmp_path, 1, 0))
    config.links.append(parse_link({"kind": "tcp-listen", "name": "dtus", "listen": "127.0.0.1:9100"}))
    config.meters.append(MeterConfig(address="000000000042", link="dtus", peer="DTU-1"))
    api = ApiServer(ApiConfig(listen="127.0.0.1:0"), CollectionStats("st-01", TZ), journal_ok=lambda: True,
                    links_up=lambda: 0)
    api.add_routes(read_routes(lambda: config, lambda m: None, Dlt645Reader("st-01", TZ, lambda m: Timing())))
    await api.start()
    try:
        async with aiohttp.ClientSession() as session:
            for body, status, text in (
                    ({"link": "bus1", "address": M1, "items": ["voltage_a"]}, 503, "not running"),
                    ({"link": "dtus", "address": M1, "items": ["voltage_a"]}, 400, "no DTU '000000000001'"),
                    ({"link": "dtus", "address": M1, "items": ["voltage_a"], "peer": "DTU-1"}, 503, "not running"),
                    ({"link": "dtus", "address": "000000000042", "items": ["voltage_a"]}, 503, "not running")):
                async with session.post(f"{api.url}/api/v1/read", json=body) as response:
                    assert response.status == status, body
                    assert text in (await response.json())["error"]
    finally:
        await api.stop()
