"""`meterd check-config`: a good file passes; a bad one says file, key (or line) and what is wrong."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[2]
METERD = str(Path(sys.executable).with_name("meterd"))

BASE = """
[station]
name = "s1"
state_dir = "state"

[[links]]
name = "bus1"
kind = "tcp"
host = "127.0.0.1"
port = 9000

[[meters]]
address = "000000000001"
link = "bus1"

[[plans]]
name = "p"
items = ["forward_active_energy"]
every = "15m"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "meterd.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("name", ["demo.toml", "production.toml"])
def test_shipped_configs_are_valid(name):
    config = load_config(ROOT / "config" / name)
    assert config.meters and config.plans and config.links


def test_relative_state_dir_is_beside_the_file(tmp_path):
    config = load_config(write(tmp_path, BASE))
    assert config.station.state_dir == (tmp_path / "state").resolve()
    assert [m.address for m in config.plan_meters(config.plans[0])] == ["000000000001"]


@pytest.mark.parametrize(("change", "message"), [
    (("port = 9000", "port = \"x\""), "links[0] (bus1).port"),
    (("link = \"bus1\"\n", "link = \"bus9\"\n"), "unknown link 'bus9'"),
    (("items = [\"forward_active_energy\"]", "items = [\"no_such\"]"), "'no_such' is not in the DL/T 645-2007 table"),
    (("every = \"15m\"", "every = \"15 minutes\""), "plans[0] (p).every"),
    (("name = \"s1\"", "name = \"s1\"\ncolour = 1"), "station.colour: Extra inputs are not permitted"),
    (("[[plans]]", "[[meters]]\naddress = \"1\"\nlink = \"bus1\"\n\n[[plans]]"), "duplicate address 000000000001"),
    (("kind = \"tcp\"", "kind = \"telnet\""), "links[0] (bus1)"),
    (("[[plans]]", "[[plans]\n"), "TOML syntax"),
])
def test_bad_configs_say_where_and_why(tmp_path, change, message):
    old, new = change
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(write(tmp_path, BASE.replace(old, new)))


def test_check_config_command(tmp_path):
    good = subprocess.run([METERD, "check-config", str(write(tmp_path, BASE))], capture_output=True, text=True,
                          check=False)
    assert good.returncode == 0 and "1 meters" in good.stdout
    bad = write(tmp_path, BASE.replace("every = \"15m\"", "at = \"25:61\""))
    result = subprocess.run([METERD, "check-config", str(bad)], capture_output=True, text=True, check=False)
    assert result.returncode == 2
    assert "plans[0] (p).at" in result.stderr and "Traceback" not in result.stderr


def test_control_secrets_file_is_beside_the_config_and_checked_without_echoing_passwords(tmp_path):
    secrets = tmp_path / "secrets.toml"
    secrets.write_text('[groups.default]\nlevel = 4\npassword = "123456"\noperator = "00000001"\n')
    secrets.chmod(0o600)
    config = load_config(write(tmp_path, BASE + '\n[control]\nsecrets_file = "secrets.toml"\n'))
    assert config.control.secrets_file == tmp_path / "secrets.toml"

    secrets.write_text('[groups.default]\nlevel = 4\npassword = "12x456"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, BASE + '\n[control]\nsecrets_file = "secrets.toml"\n'))
    assert "secrets.toml" in str(caught.value) and "12x456" not in str(caught.value)

    inline = BASE + '\n[control.groups.default]\npassword = "98765x"\n'
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, inline))
    assert "control.groups" in str(caught.value) and "98765x" not in str(caught.value)
