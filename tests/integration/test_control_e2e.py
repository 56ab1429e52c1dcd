"""Control commands survive SIGKILL at every state: no command lost, none executed twice.

metersim serves one TCP line of four meters; meterd (a real `meterd run`) has that line as a `tcp` link and
control enabled. For each state a command can be in (pending, sent, acknowledged, verified) meterd is killed
with SIGKILL while the command is in it and started again; the command must end `verified`, and the
simulator's `control_accepted` counter (1C frames the meter carried out) must be exactly one.

How each state is held long enough to be hit:
* pending: meterd starts before metersim, so its link is down and the command cannot be sent.
* sent: the meter's reply comes 3 s late (metersim's `late_reply`); meterd waits up to 6 s for it. The meter
  has acted when meterd dies, so after the restart meterd must see that in status word 3 and not resend.
* acknowledged: the meter has a 4 s trip delay, so after 9C the relay stays closed for a while.
* verified: a restart must not touch a finished command.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.integration.daemon_harness import Meterd, Metersim, processes
from tests.server_process import free_tcp_ports, http_request

pytestmark = pytest.mark.integration
BIN = Path(sys.executable).parent

DELAYED, LATE, QUEUED = "000000000501", "000000000502", "000000000503"
METERS = [DELAYED, LATE, QUEUED, "000000000504"]


def fleet(api_port: int, line_port: int) -> dict[str, Any]:
    return {
        "seed": 7, "timezone_offset_h": 8,
        "api": {"listen": f"127.0.0.1:{api_port}"},
        "buses": [{"name": "line", "tcp": f"127.0.0.1:{line_port}", "baud": 9600, "reply_delay_ms": [5, 15],
                   "meters": [{"address": a, **({"trip_delay_s": 4} if a == DELAYED else {})} for a in METERS]}],
    }


def daemon_config(tmp: Path, api_port: int, line_port: int) -> dict[str, Any]:
    return {
        "station": {"name": "ctl", "timezone": "Asia/Shanghai", "state_dir": str(tmp / "state")},
        "api": {"listen": f"127.0.0.1:{api_port}"},
        "links": [{"name": "line", "kind": "tcp", "host": "127.0.0.1", "port": line_port,
                   "first_byte_timeout": 0.5, "retries": 1}],
        "meters": [{"address": a, "link": "line", **({"first_byte_timeout": 6.0} if a == LATE else {})}
                   for a in METERS],
        "control": {"verify_timeout": "30s", "retry_every": "1s", "trip_retry_every": "1s",
                    "quiet_hours": "", "default_valid_for": "5m"},
    }


def submit(meterd: Meterd, meter: str, action: str, request_id: str) -> dict[str, Any]:
    body = json.dumps({"action": action, "request_id": request_id, "reason": "test"}).encode()
    status, raw = http_request("POST", f"{meterd.api}/api/v1/meters/{meter}/commands", body)
    assert status in (200, 202), f"POST commands: HTTP {status}: {raw[:300]!r}"
    return json.loads(raw)  # type: ignore[no-any-return]


def command(meterd: Meterd, cid: str) -> dict[str, Any]:
    status, raw = meterd.http(f"/api/v1/commands/{cid}")
    assert status == 200, f"GET command: HTTP {status}: {raw[:300]!r}"
    return json.loads(raw)  # type: ignore[no-any-return]


def in_state(meterd: Meterd, cid: str, state: str, timeout: float = 30.0) -> dict[str, Any]:
    return meterd.wait(lambda: (c := command(meterd, cid))["state"] == state and c, timeout, f"{cid} {state}")


def accepted(sim: Metersim, meter: str) -> int:
    return int(sim.get("/truth")["meters"][meter].get("control_accepted", 0))


def test_sigkill_at_every_state_loses_nothing_and_repeats_nothing(tmp_path: Path) -> None:
    sim_api, line, api = free_tcp_ports(3)
    sim = Metersim(tmp_path / "sim", fleet(sim_api, line))
    meterd = Meterd(tmp_path / "meterd", daemon_config(tmp_path, api, line))
    with processes(sim, meterd):
        # pending: the link is down (no metersim yet)
        meterd.start()
        queued = submit(meterd, QUEUED, "trip", "k-pending")
        assert queued["state"] == "pending"
        meterd.kill()
        sim.start()
        meterd.start()
        done = in_state(meterd, queued["id"], "verified")
        assert done["attempts"] == 1
        assert accepted(sim, QUEUED) == 1

        # sent: the reply is late; the meter has acted when meterd dies
        status, raw = http_request("PUT", sim.api_url + "/faults", json.dumps(
            {"scope": "meter", "meter": LATE, "faults": [{"kind": "late_reply", "delay_s": 3}]}).encode())
        assert status == 200, raw
        late = submit(meterd, LATE, "trip", "k-sent")
        in_state(meterd, late["id"], "sent", timeout=10)
        meterd.kill()
        time.sleep(3.5)  # the meter's late reply goes to a dead socket
        clear = {"scope": "meter", "meter": LATE, "faults": []}
        http_request("PUT", sim.api_url + "/faults", json.dumps(clear).encode())
        assert accepted(sim, LATE) == 1
        meterd.start()
        done = in_state(meterd, late["id"], "verified")
        assert accepted(sim, LATE) == 1, "the trip was sent again after the restart"
        assert sim.meter(LATE)["relay"]["open"] is True

        # acknowledged: the trip delay keeps the relay closed for 4 s after 9C
        delayed = submit(meterd, DELAYED, "trip", "k-ack")
        in_state(meterd, delayed["id"], "acknowledged", timeout=10)
        meterd.kill()
        meterd.start()
        done = in_state(meterd, delayed["id"], "verified")
        assert accepted(sim, DELAYED) == 1
        assert done["relay"]["relay_open"] is True

        # verified: a restart leaves it alone, and the same request_id returns the same command
        meterd.kill()
        meterd.start()
        again = submit(meterd, DELAYED, "trip", "k-ack")
        assert again["id"] == delayed["id"] and again["state"] == "verified"
        time.sleep(1.0)
        assert accepted(sim, DELAYED) == 1
        assert "meterd_control_open 0.0" in meterd.metrics()
        assert meterd.status()["control"]["duplicates"] == 1
        listed = json.loads(meterd.http(f"/api/v1/meters/{DELAYED}/commands")[1])["commands"]
        assert [c["id"] for c in listed] == [delayed["id"]]


def test_allow_close_waits_for_the_button_and_a_routine_poll_notices_the_closure(tmp_path: Path) -> None:
    """The customer's side of allow_close: pressed through metersim's API, seen by meterd's own polls."""
    sim_api, line, api = free_tcp_ports(3)
    sim = Metersim(tmp_path / "sim", fleet(sim_api, line))
    config = daemon_config(tmp_path, api, line)
    config["plans"] = [{"name": "relay", "items": ["status_word_3"], "every": "2s", "meters": [QUEUED]}]
    meterd = Meterd(tmp_path / "meterd", config)
    with processes(sim, meterd):
        sim.start()
        meterd.start()
        trip = submit(meterd, QUEUED, "trip", "t-1")
        in_state(meterd, trip["id"], "verified")
        allow = submit(meterd, QUEUED, "allow_close", "a-1")
        waiting = in_state(meterd, allow["id"], "verified")
        assert waiting["detail"] == "close allowed, waiting for the customer"
        assert sim.meter(QUEUED)["relay"]["open"] is True  # nothing closes it but the customer

        status, raw = http_request("POST", f"{sim.api_url}/meters/{QUEUED}/button", b"{}")
        assert status == 200, raw
        closed = meterd.wait(lambda: (c := command(meterd, allow["id"]))["detail"] == "closed by the customer" and c,
                             15, "the routine poll to notice the closure")
        assert closed["state"] == "verified" and closed["relay"]["relay_open"] is False
        assert accepted(sim, QUEUED) == 2  # the trip and the allow_close; the closure was the customer's

        # the field engineer's way: `meterd control ... --wait` follows the command until it ends
        result = subprocess.run([str(BIN / "meterd"), "control", QUEUED, "trip", "--reason", "test", "--wait",
                                 "--url", meterd.api], capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "verified" in result.stdout and sim.meter(QUEUED)["relay"]["open"] is True
