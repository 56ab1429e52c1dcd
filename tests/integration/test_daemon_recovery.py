"""meterd's links recover by themselves, and collection resumes, after each kind of outage.

Each test runs a real `meterd` process with one link and three meters, read by a plan every 2 s, against
a real `metersim` process (and Mosquitto for the MQTT bus), then breaks the link the way it breaks in the
field:

* (a) the RS-485 pty hangs up (a `link_drop` fault through the metersim API) and metersim opens a new pty
  behind the same symlink a second later;
* (b) the TCP serial server dies (SIGKILL) and a new one listens on the same port `OUTAGE` s later;
* (c) a 4G DTU goes silent without closing its socket (its process is frozen with SIGSTOP, as when the
  cellular link vanishes) and then dials in again with the same registration (a second metersim process
  with the same fleet): the new socket must replace the old one in meterd; the old process is then killed,
  and the close of the stale socket must not take the new one down;
* (d) the MQTT broker is stopped for `OUTAGE` s and started again.

Outages (b) and (d) span at least three plan rounds, as a real restart of a serial server or a broker does.
For each: meterd notices (the status API shows the link down, except in (c) where nothing can tell), the
link comes back by itself, every meter of the link is collected again (readings stamped after the fault
ended appear in the journal) within `RESUME_WITHIN` s, the status API shows the link up, and meterd never
exits (SIGTERM at the end: exit status 0).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_daemon_faults import BIN, Proc, get_json, put_json, wait_for
from tests.server_process import free_tcp_port

pytestmark = pytest.mark.integration

EVERY = 2.0  # s between rounds of the plan
OUTAGE = 6.5  # s a server stays away in (b) and (d): at least three rounds fail meanwhile
RESUME_WITHIN = 8.0  # s after the fault ended by which every meter of the link must be collected again
FIRST_BYTE = 1.0  # s; also on the DTU and MQTT links (their default is 10 s, too slow for a 2-s plan)
RECONNECT_MAX = 2.0  # s: the cap of meterd's reconnect backoff in these tests
SETTLE = 12.0  # s to get the first readings of every meter after start


def fleet(api: int, bus: str, exposure: str, first: int) -> str:
    return f"""
seed = 3
[api]
listen = "127.0.0.1:{api}"
[[buses]]
name = "{bus}"
{exposure}
baud = 9600
reply_delay_ms = [5, 15]
meters = 3
first_address = "{first:012d}"
"""


def addresses(first: int) -> list[str]:
    return [f"{a:012d}" for a in range(first, first + 3)]


class Rig:
    """One meterd with one link and its three meters, plus the metersim processes serving them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[Proc] = []
        self.meterd: Proc | None = None
        self.status_url = ""
        self.state = tmp / "state"
        self.link = ""
        self.meters: list[str] = []
        self.timings: dict[str, float] = {}

    def sim(self, name: str, fleet_text: str) -> tuple[Proc, str]:
        """A metersim process; returns it and its API URL once it printed `ready`."""
        path = self.tmp / f"{name}.toml"
        path.write_text(fleet_text)
        api = next(line.split("=")[1].strip().strip('"') for line in fleet_text.splitlines()
                   if line.startswith("listen"))
        proc = Proc([str(BIN / "metersim"), "serve", "--fleet", str(path)], self.tmp / f"{name}.log",
                    stdout_pipe=True)
        self.procs.append(proc)
        proc.read_until("ready", 20.0)
        return proc, f"http://{api}"

    def start_meterd(self, link: str, link_toml: str, meters: list[str], peer: str | None = None) -> None:
        self.link, self.meters = link, meters
        api = free_tcp_port()
        entries = "".join(f'\n[[meters]]\naddress = "{a}"\nlink = "{link}"\n' + (f'peer = "{peer}"\n' if peer else "")
                          for a in meters)
        config = self.tmp / "meterd.toml"
        config.write_text(f"""
[station]
name = "recovery"
timezone = "Asia/Shanghai"
state_dir = "{self.state}"

[api]
listen = "127.0.0.1:{api}"

[[links]]
name = "{link}"
first_byte_timeout = {FIRST_BYTE}
reconnect_max = {RECONNECT_MAX}
{link_toml}
{entries}
[[plans]]
name = "poll"
items = ["forward_active_energy"]
every = "{EVERY:g}s"
""")
        self.meterd = Proc([str(BIN / "meterd"), "run", "--config", str(config)], self.tmp / "meterd.log")
        self.procs.append(self.meterd)
        self.status_url = f"http://127.0.0.1:{api}/api/v1/status"
        wait_for("meterd's API", lambda: get_json(self.status_url), 20.0)

    # --- what meterd says ----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        assert self.meterd is not None and self.meterd.alive, f"meterd exited:\n{self.tail()}"
        return get_json(self.status_url)

    def link_up(self, name: str | None = None) -> bool | None:
        state = self.status()["links"].get(name or self.link)
        return None if state is None else bool(state["up"])

    def last_reading(self) -> dict[str, float]:
        """Per meter of the link, the newest reading's time in the journal (read-only, meterd's own query)."""
        from gateway import journal_store  # noqa: PLC0415

        path = self.state / "journal.sqlite"
        if not path.exists():
            return {}
        conn = journal_store.connect(path, readonly=True)
        try:
            return {m: max((r.time for r in journal_store.query(conn, meter=m, limit=5)), default=0.0)
                    for m in self.meters}
        finally:
            conn.close()

    def wait_collected_after(self, since: float, timeout: float, what: str) -> float:
        """Seconds until every meter of the link has a reading stamped after `since`."""
        def all_after() -> bool:
            assert self.meterd is not None and self.meterd.alive, f"meterd exited:\n{self.tail()}"
            last = self.last_reading()
            return bool(last) and all(t > since for t in last.values())

        begin = time.time()
        try:
            wait_for(what, all_after, timeout, interval=0.1)
        except AssertionError as exc:
            status = self.status()
            raise AssertionError(
                f"{exc}\nnewest readings (s after the fault ended): "
                f"{ {m: round(t - since, 1) for m, t in self.last_reading().items()} }\n"
                f"links: {status['links']}\nfailing meters: "
                f"{[(m['meter'], m['reason'], m['detail']) for m in status['meters']['top_failing']]}\n"
                f"meterd log:\n{self.tail()}") from None
        elapsed = time.time() - (since or begin)
        self.timings[what] = round(elapsed, 2)
        assert time.time() - begin <= timeout + 1
        return elapsed

    def wait_link_up(self, since: float, what: str) -> None:
        wait_for(what, lambda: self.link_up() is True, RESUME_WITHIN)
        self.timings[what] = round(time.time() - since, 2)

    def tail(self) -> str:
        return self.meterd.tail(30) if self.meterd is not None else ""

    def finish(self) -> None:
        assert self.meterd is not None
        assert self.meterd.alive, f"meterd exited:\n{self.tail()}"
        print(f"{self.link}: {self.timings}")
        assert self.meterd.stop() == 0, self.tail()

    def close(self) -> None:
        for p in reversed(self.procs):
            p.stop()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def truth_bus(sim_url: str, bus: str) -> dict[str, Any]:
    bus_truth: dict[str, Any] = get_json(f"{sim_url}/truth?bus={bus}")["buses"][bus]
    return bus_truth


# --- (a) the pty hangs up and comes back ----------------------------------------------------------------
def test_pty_hang_up_and_back(rig: Rig) -> None:
    link_path = rig.tmp / "rs485"
    meters = addresses(201)
    _, sim = rig.sim("sim-pty", fleet(free_tcp_port(), "rs485", f'pty = "{link_path}"', 201))
    rig.start_meterd("rs485", f'kind = "serial"\nport = "{link_path}"\nbaud = 9600\nparity = "E"', meters)
    rig.wait_collected_after(0, SETTLE, "first readings")

    put_json(f"{sim}/faults", {"scope": "bus", "bus": "rs485", "faults": [{"kind": "link_drop"}]})
    wait_for("the pty to hang up", lambda: truth_bus(sim, "rs485").get("pty_hangups", 0) >= 1, 2 * EVERY + 2)
    put_json(f"{sim}/faults", {"scope": "bus", "bus": "rs485", "faults": []})
    wait_for("meterd to see the link down", lambda: rig.link_up() is False, 3.0)
    wait_for("metersim to open a new pty", lambda: truth_bus(sim, "rs485").get("pty_opens", 0) >= 2, 5.0)
    back = time.time()
    assert os.path.realpath(link_path).startswith("/dev/pts/")

    rig.wait_link_up(back, "link up after the pty came back")
    rig.wait_collected_after(back, RESUME_WITHIN, "collection resumed after the pty came back")
    assert truth_bus(sim, "rs485")["pty_hangups"] == 1
    rig.finish()


# --- (b) the TCP serial server restarts -----------------------------------------------------------------
def test_tcp_serial_server_restart(rig: Rig) -> None:
    port = free_tcp_port()
    meters = addresses(301)
    api = free_tcp_port()
    text = fleet(api, "server", f'tcp = "127.0.0.1:{port}"', 301)
    first, _ = rig.sim("sim-tcp-1", text)
    rig.start_meterd("server", f'kind = "tcp"\nhost = "127.0.0.1"\nport = {port}', meters)
    rig.wait_collected_after(0, SETTLE, "first readings")

    first.proc.send_signal(signal.SIGKILL)  # the serial server loses power
    first.proc.wait()
    wait_for("meterd to see the link down", lambda: rig.link_up() is False, 3.0)
    time.sleep(OUTAGE)
    _, sim = rig.sim("sim-tcp-2", text.replace(f":{api}", f":{free_tcp_port()}"))  # the same bus port
    back = time.time()

    rig.wait_link_up(back, "link up after the server restarted")
    rig.wait_collected_after(back, RESUME_WITHIN, "collection resumed after the server restarted")
    assert truth_bus(sim, "server")["connections"] == 1
    rig.finish()


# --- (c) a DTU redials with the same registration -------------------------------------------------------
def test_dtu_redials_with_the_same_registration(rig: Rig) -> None:
    port = free_tcp_port()
    meters = addresses(401)
    dtu = f'dtu = {{host = "127.0.0.1", port = {port}, registration = "DTU-07"}}'
    rig.start_meterd("dtus", f'kind = "tcp-listen"\nlisten = "127.0.0.1:{port}"\nidentify = "registration"\n'
                     'registration = { match = "regex:DTU-\\\\d+", mode = "once" }', meters, peer="DTU-07")
    old, _ = rig.sim("sim-dtu-1", fleet(free_tcp_port(), "dtu-07", dtu, 401))
    rig.wait_collected_after(0, SETTLE, "first readings")
    peer = "dtus/DTU-07"

    old.proc.send_signal(signal.SIGSTOP)  # the cellular link vanished: no FIN, the socket looks alive
    frozen = time.time()
    time.sleep(EVERY)
    # the DTU comes back and dials in with the same registration
    _, sim = rig.sim("sim-dtu-2", fleet(free_tcp_port(), "dtu-07", dtu, 401))
    wait_for("the new DTU to connect", lambda: truth_bus(sim, "dtu-07").get("dtu_connects", 0) >= 1, 5.0)
    back = time.time()
    rig.wait_collected_after(back, RESUME_WITHIN, "collection resumed through the new socket")
    assert truth_bus(sim, "dtu-07").get("replies", 0) >= len(meters), "meterd did not talk to the new DTU"

    old.proc.send_signal(signal.SIGKILL)  # now the stale socket closes: it must not take the new one down
    old.proc.wait()
    killed = time.time()
    rig.wait_collected_after(killed, RESUME_WITHIN, "collection continues after the stale socket closed")
    assert rig.meterd is not None
    log = rig.meterd.log.read_text()
    assert "new connection replaces the old one" in log
    rig.timings["frozen for"] = round(back - frozen, 2)
    # The configured peer is a link like any other: reported in the status, and never called unknown.
    problems = []
    if rig.link_up(peer) is not True:
        problems.append(f"/api/v1/status links has no {peer} up: {rig.status()['links']}")
    if "which no meter uses" in log:
        problems.append("meterd logged the configured DTU-07 as an identity no meter uses")
    assert not problems, "\n".join(problems)
    rig.finish()


# --- (d) the MQTT broker restarts -----------------------------------------------------------------------
def test_mqtt_broker_restart(rig: Rig, mosquitto: Any, unique_topic: str) -> None:
    url = f"mqtt://{mosquitto.host}:{mosquitto.port}"
    req, resp = f"{unique_topic}/request", f"{unique_topic}/response"
    meters = addresses(501)
    # The simulated meters redial the broker as meterd does (capped at RECONNECT_MAX): with metersim's 30-s
    # default cap, its own backoff, not meterd, would decide when collection can resume.
    exposure = (f'mqtt = {{url = "{url}", request_topic = "{req}", response_topic = "{resp}", '
                f'reconnect_max = {RECONNECT_MAX}}}')
    _, sim = rig.sim("sim-mqtt", fleet(free_tcp_port(), "air", exposure, 501))
    rig.start_meterd("air", f'kind = "mqtt"\nurl = "{url}"\nrequest_topic = "{req}"\nresponse_topic = "{resp}"',
                     meters)
    rig.wait_collected_after(0, SETTLE, "first readings")

    with mosquitto.stopped():
        wait_for("meterd to see the link down", lambda: rig.link_up() is False, 3.0)
        time.sleep(OUTAGE)
    back = time.time()

    rig.wait_link_up(back, "link up after the broker restarted")
    rig.wait_collected_after(back, RESUME_WITHIN, "collection resumed after the broker restarted")
    assert truth_bus(sim, "air").get("mqtt_connects", 0) >= 2
    rig.finish()
