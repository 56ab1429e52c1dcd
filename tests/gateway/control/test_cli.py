"""`meterd control` against a real ApiServer with the control routes on 127.0.0.1: what an operator
types, what they see while a command progresses, and the exit status scripts rely on.

The engine is test_api's FakeControl; here it moves a command one state further each time the
CLI asks for it, so every state change is seen exactly once without any timing."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gateway.api import ApiConfig, ApiServer
from gateway.control import cli as control_cli
from gateway.control.api import control_routes
from gateway.control.model import Command, State
from gateway.stats import CollectionStats
from tests.gateway.control.test_api import METER, TOKEN, FakeControl
from tests.server_process import free_tcp_port

LIFE = [(State.SENT, {"attempts": 1}), (State.ACKNOWLEDGED, {}), (State.VERIFIED, {"detail": "relay open"})]


class ScriptedControl(FakeControl):
    """Each `get` moves the command to the next state of `script` (what the engine would have done)."""

    def __init__(self, script: list[tuple[State, dict[str, Any]]], first: State = State.PENDING,
                 **first_changes: Any) -> None:
        super().__init__()
        self.script = list(script)
        self.first, self.first_changes = first, first_changes
        self.gets = 0

    async def submit(self, meter: str, action: Any, **kw: Any) -> Command:
        command = await super().submit(meter, action, **kw)
        if self.first is not State.PENDING and command.state is State.PENDING:
            command = self.move(command.id, self.first, **self.first_changes)
        return command

    async def get(self, command_id: str) -> Command:
        self.gets += 1
        if self.script and command_id in self.commands:
            state, changes = self.script.pop(0)
            self.move(command_id, state, **changes)
        return await super().get(command_id)


@pytest.fixture(autouse=True)
def no_local_daemon_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("METERD_TOKEN", raising=False)
    monkeypatch.setenv("METERD_CONFIG", str(tmp_path / "absent.toml"))


@contextlib.asynccontextmanager
async def served(control: FakeControl, port: int = 0) -> AsyncIterator[str]:
    server = ApiServer(ApiConfig(listen=f"127.0.0.1:{port}", token=TOKEN), CollectionStats("st-01", ZoneInfo("UTC")),
                       journal_ok=lambda: True, links_up=lambda: 1)
    server.add_routes(control_routes(control))
    await server.start()
    try:
        yield server.url
    finally:
        await server.stop()


def cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="meterd")
    control_cli.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["control", *argv])
    code: int = args.handler(args)
    return code


async def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(cli, *argv)
    out, err = capsys.readouterr()
    return code, out, err


def lines(text: str) -> Iterator[str]:
    return (line for line in text.splitlines() if line.strip())


async def test_wait_prints_every_state_change_and_exits_0_when_verified(capsys: pytest.CaptureFixture[str]) -> None:
    control = ScriptedControl(LIFE)
    async with served(control) as url:
        code, out, err = await run(capsys, METER, "close", "--reason", "paid 50", "--request-id", "pay-1",
                                   "--valid-for", "30m", "--wait", "--url", url, "--token", TOKEN, "--interval", "0")
    assert code == 0, err
    (command,) = control.commands.values()
    head, *changes = lines(out)
    assert head.startswith(f"command {command.id}: close meter {METER} (request pay-1, valid until ")
    assert [c.split()[1] for c in changes] == ["pending", "sent", "acknowledged", "verified"]
    assert "attempt 1" in changes[1] and changes[-1].endswith("relay open")
    assert control.calls[0]["valid_for"] == 1800.0 and control.calls[0]["reason"] == "paid 50"


async def test_a_failed_command_exits_1_with_its_reason(capsys: pytest.CaptureFixture[str]) -> None:
    control = ScriptedControl([(State.SENT, {"attempts": 1}),
                               (State.FAILED, {"fail_reason": "unauthorised", "detail": "the meter said ERR 04"})])
    async with served(control) as url:
        code, out, _ = await run(capsys, METER, "trip", "--wait", "--url", url, "--token", TOKEN, "--interval", "0")
    assert code == 1
    assert list(lines(out))[-1].split()[1:] == ["failed", "attempt", "1", "unauthorised", "the", "meter", "said",
                                                "ERR", "04"]


@pytest.mark.parametrize(("state", "code"), [(State.EXPIRED, 1), (State.SUPERSEDED, 1), (State.DRY_RUN, 0)])
async def test_exit_status_follows_the_end_state(capsys: pytest.CaptureFixture[str], state: State, code: int) -> None:
    async with served(ScriptedControl([(state, {})])) as url:
        assert (await run(capsys, METER, "alarm", "--wait", "--url", url, "--token", TOKEN, "--interval", "0"))[0] \
            == code


async def test_without_wait_it_prints_the_accepted_command_and_a_guard_refusal_is_1(
        capsys: pytest.CaptureFixture[str]) -> None:
    async with served(ScriptedControl(LIFE)) as url:
        code, out, _ = await run(capsys, METER, "trip", "--url", url, "--token", TOKEN)
    assert code == 0 and "pending" in out
    refused = ScriptedControl([], State.FAILED, fail_reason="quiet_hours", detail="no trips 20:00-08:00")
    async with served(refused) as url:
        code, out, _ = await run(capsys, METER, "trip", "--url", url, "--token", TOKEN, "--json")
    command = json.loads(out)
    assert code == 1 and command["state"] == "failed" and command["fail_reason"] == "quiet_hours"
    assert refused.gets == 0  # nothing to follow without --wait


async def test_json_with_wait_is_one_line_per_change(capsys: pytest.CaptureFixture[str]) -> None:
    async with served(ScriptedControl(LIFE)) as url:
        code, out, _ = await run(capsys, METER, "close", "--wait", "--json", "--url", url, "--token", TOKEN,
                                 "--interval", "0")
    assert code == 0
    assert [json.loads(line)["state"] for line in lines(out)] == ["pending", "sent", "acknowledged", "verified"]


async def test_the_wait_ends_at_the_timeout_while_the_daemon_goes_on(capsys: pytest.CaptureFixture[str]) -> None:
    control = ScriptedControl([])
    async with served(control) as url:
        code, _, err = await run(capsys, METER, "trip", "--wait", "--timeout", "0.2", "--url", url, "--token", TOKEN,
                                 "--interval", "0.05")
    assert code == 1 and "stopped waiting after 0.2 s" in err and "still pending" in err and control.gets >= 1


@pytest.mark.parametrize(("argv", "says"), [
    (("12345", "trip"), "12 digits"),
    ((METER, "explode"), "unknown action 'explode'; actions are trip, allow_close"),
    ((METER, "trip", "--valid-for", "soon"), "valid_for"),
    ((METER, "trip", "--timeout", "0"), "--timeout must be > 0"),
    ((METER, "trip", "--url", "ftp://x"), "--url must be http://HOST:PORT"),
    ((METER, "trip", "--config", "/nonexistent/meterd.toml"), "cannot read"),
])
async def test_usage_errors_exit_2_before_anything_is_sent(
        capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], says: str) -> None:
    control = ScriptedControl(LIFE)
    async with served(control) as url:
        code, _, err = await run(capsys, *argv, *(() if "--url" in argv or "--config" in argv else ("--url", url)),
                                 "--token", TOKEN)
    assert code == 2 and says in err, err
    assert not control.calls


async def test_refusals_and_a_missing_daemon_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    async with served(ScriptedControl(LIFE)) as url:
        code, _, err = await run(capsys, "999999999999", "trip", "--url", url, "--token", TOKEN)
        assert code == 2 and "the daemon refused: meter 999999999999 is not in the archive" in err
        code, _, err = await run(capsys, METER, "trip", "--url", url, "--token", "wrong")
        assert code == 2 and "token" in err
    code, _, err = await run(capsys, METER, "trip", "--url", f"http://127.0.0.1:{free_tcp_port()}")
    assert code == 2 and "meterd is not running at" in err


async def test_the_daemon_is_found_from_its_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    port = free_tcp_port()
    config = tmp_path / "meterd.toml"
    config.write_text(f'[station]\nname = "st-01"\nstate_dir = "{tmp_path / "state"}"\n'
                      f'[api]\nlisten = "127.0.0.1:{port}"\ntoken = "{TOKEN}"\n')
    control = ScriptedControl(LIFE)
    async with served(control, port):
        code, out, err = await run(capsys, METER, "hold", "--config", str(config))
    assert code == 0, err
    assert "hold meter" in out and len(control.commands) == 1
