"""`meterd readings` on a real journal: three formats, time filters, read-only while the
daemon holds the journal, and clear errors with exit status 2."""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import time

import pytest

from gateway import readings_cli
from gateway.journal import Journal, JournalConfig
from gateway.model import Quality, Reading

METER = "000102030405"
NOW = time.time()
HOUR = 3600.0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="meterd")
    readings_cli.add_parser(p.add_subparsers(dest="command"))
    return p


def meterd(capsys, *argv: str) -> tuple[int, str, str]:
    args = parser().parse_args(["readings", *argv])
    code = args.handler(args)
    out, err = capsys.readouterr()
    return code, out, err


def sample() -> list[Reading]:
    energy = [Reading(METER, "forward_active_energy", 1200.0 + h, "kWh", NOW - h * HOUR, NOW, station="s1",
                      link="bus1", plan="15m") for h in range(1, 49)]
    return [*energy,
            Reading(METER, "status_word_3", 16, "", NOW - 30, NOW),
            Reading(METER, "frozen_energy", 1188.25, "kWh", NOW - 600, NOW, frozen=True, quality=Quality.INVALID),
            Reading(METER, "relay_closed", True, "", NOW - 20, NOW),
            Reading("999999999999", "forward_active_energy", 1.0, "kWh", NOW, NOW)]


@pytest.fixture
async def state(tmp_path):
    async with Journal(tmp_path / "journal.sqlite", JournalConfig(commit_interval=0.01)) as j:
        await j.append(sample())
    return tmp_path


async def test_json_keeps_types_and_filters(state, capsys):
    code, out, err = meterd(capsys, "--state-dir", str(state), "--meter", METER, "--since", "-3h", "--format", "json")
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    by_quantity = {r["quantity"]: r for r in rows}
    assert len(rows) == 2 + 3  # energy at -1h and -2h, plus the three recent readings
    assert by_quantity["status_word_3"]["value"] == 16 and isinstance(by_quantity["status_word_3"]["value"], int)
    assert by_quantity["relay_closed"]["value"] is True
    assert by_quantity["frozen_energy"] | {"time": None, "collected": None} == {
        "meter": METER, "quantity": "frozen_energy", "value": 1188.25, "unit": "kWh", "time": None,
        "collected": None, "quality": "invalid", "frozen": True, "station": "", "link": "", "plan": ""}
    assert dt.datetime.fromisoformat(rows[-1]["time"]).timestamp() == pytest.approx(NOW - 20, abs=1e-3)
    assert [dt.datetime.fromisoformat(r["time"]) for r in rows] == sorted(dt.datetime.fromisoformat(r["time"])
                                                                          for r in rows)  # newest last


async def test_csv_quantity_until_and_limit(state, capsys):
    until = dt.datetime.fromtimestamp(NOW - 10 * HOUR + 0.5).astimezone().isoformat()  # ISO keeps only µs
    code, out, _ = meterd(capsys, "--state-dir", str(state), "--meter", METER, "--quantity", "forward_active_energy",
                          f"--until={until}", "--limit", "3", "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [float(r["value"]) for r in rows] == [1212.0, 1211.0, 1210.0]  # the newest 3 at or before -10h
    assert set(rows[0]) == set(readings_cli.FIELDS) and rows[0]["station"] == "s1"


async def test_table_while_the_daemon_holds_the_journal(tmp_path, capsys):
    config = tmp_path / "meterd.toml"
    config.write_text(f'[station]\nname = "s1"\nstate_dir = "{tmp_path / "state"}"\n')
    async with Journal(tmp_path / "state" / "journal.sqlite", JournalConfig(commit_interval=0.01)) as j:
        await j.append(sample())
        code, out, err = meterd(capsys, "--config", str(config), "--meter", METER, "--since", "-90m")
    assert code == 0, err
    assert f"meter {METER}: 4 readings" in out
    for text in ("forward_active_energy", "1201.0", "kWh", "frozen_energy", "invalid", "yes", "True", "16"):
        assert text in out
    local = dt.datetime.fromtimestamp(NOW - 20).strftime("%Y-%m-%d %H:%M:%S")
    assert local in out


async def test_no_readings_is_not_an_error(state, capsys):
    code, out, err = meterd(capsys, "--state-dir", str(state), "--meter", "111111111111")
    assert code == 0 and out == ""
    assert "no readings for meter 111111111111" in err and "2 meter(s)" in err


@pytest.mark.parametrize(("argv", "message"), [
    (["--meter", "12345"], "12 digits"),
    (["--meter", "00010203040A"], "12 digits"),
    (["--meter", METER, "--since", "yesterday"], "--since 'yesterday': use ISO 8601"),
    (["--meter", METER, "--until", "2024-13-01"], "--until '2024-13-01'"),
    (["--meter", METER, "--limit", "0"], "at least 1"),
])
async def test_bad_arguments_exit_2(state, capsys, argv, message):
    code, out, err = meterd(capsys, "--state-dir", str(state), *argv)
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1


async def test_missing_or_bad_journal_and_config_exit_2(tmp_path, capsys):
    code, _, err = meterd(capsys, "--state-dir", str(tmp_path / "nowhere"), "--meter", METER)
    assert code == 2 and "no journal at" in err
    (tmp_path / "journal.sqlite").write_bytes(b"garbage" * 1000)
    code, _, err = meterd(capsys, "--state-dir", str(tmp_path), "--meter", METER)
    assert code == 2 and "corrupt" in err
    (tmp_path / "a.toml").write_text("[station]\nname = 's1'\n")
    code, _, err = meterd(capsys, "--config", str(tmp_path / "a.toml"), "--meter", METER)
    assert code == 2 and "no [station] state_dir" in err
    (tmp_path / "b.toml").write_text("[station\n")
    code, _, err = meterd(capsys, "--config", str(tmp_path / "b.toml"), "--meter", METER)
    assert code == 2 and "not valid TOML" in err
    code, _, err = meterd(capsys, "--config", str(tmp_path / "c.toml"), "--meter", METER)
    assert code == 2 and "cannot read config" in err


def test_relative_and_iso_times():
    now = 1_700_000_000.0
    assert readings_cli.parse_time("-1h", "--since", now) == now - 3600
    assert readings_cli.parse_time("2d", "--since", now) == now - 2 * 86400
    assert readings_cli.parse_time("-30m", "--since", now) == now - 1800
    assert readings_cli.parse_time("now", "--until", now) == now
    assert readings_cli.parse_time("2023-11-14T22:13:20+00:00", "--since", now) == now
    assert readings_cli.parse_time("2023-11-14T22:13:20Z", "--since", now) == now
    naive = dt.datetime(2024, 5, 1, 0, 10)
    assert readings_cli.parse_time("2024-05-01T00:10", "--since", now) == naive.timestamp()
    assert readings_cli.parse_time(None, "--since", now) is None
