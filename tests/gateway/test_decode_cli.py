"""`meterd decode` as a field engineer uses it: pasted captures in, JSON out, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

METERD = str(Path(sys.executable).with_name("meterd"))
V06 = "68 25 04 03 02 01 00 68 91 08 33 33 34 33 75 39 45 33 8B 16"
V21 = "68 11 11 11 11 11 11 68 1C 10 33 33 33 33 33 33 33 33 4D 33 57 74 48 45 38 4B 55 16"


def meterd(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([METERD, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False)


def lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def test_unquoted_bytes_are_one_frame():
    result = meterd("decode", *("FE FE " + V06).split())
    assert result.returncode == 0, result.stderr
    [obj] = lines(result.stdout)
    assert obj["address"] == "000102030425"
    assert obj["di"] == "00010000"
    assert obj["direction"] == "reply" and obj["function_name"] == "read"
    assert obj["values"] == {"forward_active_energy": {"value": 1206.42, "unit": "kWh"}}


def test_several_captures_and_control_request_without_password():
    result = meterd("decode", V06.replace(" ", ""), V21)
    assert result.returncode == 0, result.stderr
    first, second = lines(result.stdout)
    assert first["values"]["forward_active_energy"]["value"] == 1206.42
    assert second["control_action"] == "TRIP"
    assert second["deadline"] == "2018-05-12T15:41:24"
    assert "password" not in second


def test_frames_stuck_together_in_one_capture():
    result = meterd("decode", (V06 + " FE FE " + V06).replace(" ", ""))
    assert result.returncode == 0
    assert len(lines(result.stdout)) == 2


def test_abnormal_reply_shows_error_bits():
    result = meterd("decode", "68 11 11 11 11 11 11 68 D1 01 39 41 16".replace(" ", ""))
    assert result.returncode == 0, result.stderr
    [obj] = lines(result.stdout)
    assert obj["abnormal"] is True
    assert obj["error"] == {"code": 6, "bits": ["no_data", "unauthorized"]}


def test_stdin_and_bad_input_exit_1_with_reasons_on_stderr():
    broken = V06[:-5] + "8C 16"
    result = meterd("decode", "-", stdin=f"{V06}\n{broken}\nzz\n68 25 04\n")
    assert result.returncode == 1
    assert len(lines(result.stdout)) == 1
    errors = result.stderr.splitlines()
    assert len(errors) == 3
    assert "bad_checksum" in errors[0]
    assert "not hex" in errors[1]
    assert "truncated" in errors[2]
