"""Fleet files and quick flags: what they build, and the exact messages for what is wrong with them."""

from __future__ import annotations

import datetime as dt
import tomllib
from pathlib import Path

import pytest

from simulators.cli import fleet_from_args, main, parser
from simulators.fleet import build, load, parse, plan
from simulators.fleetfile import FleetError

CONFIG = Path(__file__).resolve().parents[2] / "config"
NOW = 1_760_000_000.0  # 2025-10-09 08:53:20 UTC

FULL = """
seed = 3
timezone_offset_h = 8
history_days = 65

[api]
listen = "127.0.0.1:0"

[[buses]]
name = "a"
tcp = "127.0.0.1:9000"
baud = 9600
reply_delay_ms = [5, 15]
gap_ms = 2
meters = 3
first_address = "000000000011"
price = 0.8

[[buses]]
name = "s"
serial = "/dev/ttyUSB0"
parity = "N"
passwords = {2 = "123456"}

  [[buses.meters]]
  address = "000000000001"
  edition = 1997
  phases = 3
  tariffs = 2
  prepaid = false
  preamble = 4
  clock_offset_s = -30.5
  drift_ppm = 20
  load_kw = 2.5
  seed = 99

  [[buses.meters]]
  from = "000000000100"
  count = 2
  trip_delay_s = 60
  balance = 12.5
  passwords = {4 = "654321"}

[[buses]]
name = "d{n}"
repeat = 2
meters = 2
first_address = "000000000200"
dtu = { host = "gw", port = 7000, registration = "REG-{bus}", register_mode = "both", heartbeat = "hex:fe01",\
        heartbeat_s = 5, reconnect_min = 0.5, reconnect_max = 4 }

[[buses]]
name = "m"
repeat = 2
tcp = "127.0.0.1:9100"
mqtt = { url = "mqtt://broker", request_topic = "x/{bus}/req", response_topic = "x/{bus}/rsp", encoding = "hex" }
meters = 1
first_address = "000000000300"

[[faults]]
kind = "late_reply"
meter = "000000000012"
every = 3
delay_s = 1.5

[[faults]]
kind = "dead"
bus = "d2"
after_s = 10
for_s = 20

[[faults]]
kind = "garbage"
start = 2025-10-09T17:00:00
end = 1760100000
probability = 0.25
bytes = 4
"""


def spec(text: str, source: str = "f.toml"):
    return parse(tomllib.loads(text), source)


def test_the_example_fleets_are_valid():
    sizes = {}
    for path in sorted(CONFIG.glob("fleet-*.toml")):
        sizes[path.name] = sum(len(b.meters) for b in plan(load(path)))
    assert sizes == {"fleet-1997.toml": 41, "fleet-large.toml": 100_000, "fleet-small.toml": 35}


def test_a_fleet_file_builds_its_buses_meters_exposures_and_faults():
    with pytest.raises(FleetError, match=r"^f.toml: buses\[3\]: one exposure per bus .*got tcp and mqtt$"):
        spec(FULL)
    fleet = build(spec(FULL.replace('tcp = "127.0.0.1:9100"\n', "")), now=NOW)
    assert [b.name for b in fleet.buses] == ["a", "s", "d1", "d2", "m-1", "m-2"]
    a, s, d1, d2, m1, m2 = fleet.buses
    assert list(a.meters) == ["000000000011", "000000000012", "000000000013"]
    assert (a.wire.baud, a.wire.delay_min, a.wire.delay_max, a.wire.gap, a.wire.request_on_wire) == (
        9600, 0.005, 0.015, 0.002, True)
    assert s.wire.request_on_wire is False and s.wire.baud == 2400  # a real serial line carries the request itself
    assert fleet.endpoints["a"].options == {"host": "127.0.0.1", "port": 9000}
    assert fleet.endpoints["s"].options == {"device": "/dev/ttyUSB0", "baud": 2400, "parity": "N"}
    assert fleet.endpoints["d2"].options == {"host": "gw", "port": 7000, "registration": b"REG-d2",
                                             "register_mode": "both", "heartbeat": b"\xfe\x01", "heartbeat_s": 5.0,
                                             "reconnect_min": 0.5, "reconnect_max": 4.0}
    assert list(d1.meters) == ["000000000200", "000000000201"] and list(d2.meters) == ["000000000202", "000000000203"]
    assert fleet.endpoints["m-2"].options == {"url": "mqtt://broker", "request_topic": "x/m-2/req",
                                              "response_topic": "x/m-2/rsp", "encoding": "hex",
                                              "reconnect_min": 1.0, "reconnect_max": 30.0}
    assert list(m1.meters) == ["000000000300"] and list(m2.meters) == ["000000000301"]

    old = s.meters["000000000001"]
    assert (old.edition, old.phases, old.tariffs, old.prepaid, old.seed) == (1997, 3, 2, False, 99)
    assert old.passwords == {2: "123456"}
    assert s.preamble == {"000000000001": 4}
    assert old.clock_local(NOW) - old.real_local(NOW) == pytest.approx(-30.5)
    assert old.clock_local(NOW + 1e6) - old.real_local(NOW + 1e6) == pytest.approx(-30.5 + 20)
    assert old.load_kw(old.real_local(NOW + 60)) == 2.5
    ranged = [s.meters["000000000100"], s.meters["000000000101"]]
    assert [m.relay.trip_delay_s for m in ranged] == [60, 60]
    assert ranged[0].passwords == {4: "654321"}  # an entry's table replaces the bus's
    assert ranged[1].balance(ranged[1].real_local(NOW)) == 12.5
    assert a.meters["000000000011"].price == 0.8
    assert a.meters["000000000011"].seed == 11 + 3 * 10**12  # the fleet seed moves every meter's randomness

    late, dead, garbage = fleet.faults.rules
    assert (late.kind, late.meter, late.every, late.params) == ("late_reply", "000000000012", 3, {"delay_s": 1.5})
    assert (dead.bus, dead.start, dead.end) == ("d2", NOW + 10, NOW + 30)
    assert garbage.start == dt.datetime(2025, 10, 9, 9, tzinfo=dt.UTC).timestamp()  # local UTC+8
    assert (garbage.end, garbage.probability, garbage.params) == (1760100000, 0.25, {"bytes": 4.0})
    assert all(b.faults is fleet.faults for b in fleet.buses)
    assert fleet.api == ("127.0.0.1", 0)


def test_meters_are_reproducible_from_the_seed():
    text = '[[buses]]\nname = "a"\ntcp = "127.0.0.1:0"\nmeters = 2\n'
    one, two = build(spec(text), now=NOW), build(spec(text), now=NOW)
    other = build(spec("seed = 5\n" + text), now=NOW)
    state = [m.state(NOW + 3600)["registers"] for f in (one, two, other) for m in f.buses[0].meters.values()]
    assert state[0:2] == state[2:4] != state[4:6]


BUS = '[[buses]]\nname = "a"\ntcp = "127.0.0.1:0"\nmeters = 2\n'
BAD = [
    ("seed = 'x'\n" + BUS, "f.toml: seed: Input should be a valid integer, got 'x'"),
    ("[[buses]]\nname = 'a'\nmeters = 2\n", "f.toml: buses[0]: one exposure per bus (tcp, pty, serial, dtu, mqtt); "
                                            "none given"),
    (BUS + "bawd = 2400\n", "f.toml: buses[0].bawd: unknown key"),
    (BUS + "baud = 50\n", "f.toml: buses[0].baud: baud must be 0 (no wire emulation) or 300..115200, got 50"),
    (BUS + "reply_delay_ms = [80, 20]\n",
     "f.toml: buses[0].reply_delay_ms: [min, max] in ms with 0 <= min <= max expected, got [80, 20]"),
    (BUS + "edition = 2003\n", "f.toml: buses[0].edition: Input should be 2007 or 1997, got 2003"),
    (BUS + "first_address = '12345'\n",
     "f.toml: buses[0].first_address: a meter address is 12 decimal digits, got '12345'"),
    (BUS.replace("meters = 2", "meters = '2'"),
     "f.toml: buses[0].meters: a number of meters or [[buses.meters]] entries expected, got '2'"),
    (BUS.replace("meters = 2\n", "[[buses.meters]]\naddress = '000000000001'\n[[buses.meters]]\nfrom = '000000000002'"
                                 "\ncount = 0\npasswords = {2 = '12ab56'}\n"),
     "f.toml: buses[0].meters[1].passwords: password for level 2 must be 6 digits, got '12ab56'\n"
     "f.toml: buses[0].meters[1].count: Input should be greater than or equal to 1, got 0"),
    (BUS.replace("meters = 2\n", "[[buses.meters]]\nphases = 3\n"),
     "f.toml: buses[0].meters[0]: give either address or from (+ count)"),
    (BUS.replace('tcp = "127.0.0.1:0"', 'dtu = {host = "h", port = 1, registration = "hex:zz"}'),
     "f.toml: buses[0].dtu.registration: not valid hex after 'hex:': 'zz'"),
    (BUS.replace('tcp = "127.0.0.1:0"', 'mqtt = {url = "mqtt://b", reconnect_min = 5, reconnect_max = 2}'),
     "f.toml: buses[0].mqtt: reconnect_max (2) is below reconnect_min (5)"),
    (BUS.replace('tcp = "127.0.0.1:0"', 'dtu = {host = "h", port = 1, reconnect_min = 0}'),
     "f.toml: buses[0].dtu.reconnect_min: Input should be greater than 0, got 0"),
    (BUS.replace('tcp = "127.0.0.1:0"', 'pty = "/tmp/x"') + "repeat = 2\n",
     "f.toml: buses[0]: repeat with a pty link needs {n} in the link path"),
    (BUS + "first_address = '999999999999'\n",
     "f.toml: buses[0]: addresses from 999999999999 run past 999999999999"),
    (BUS + "[[faults]]\nkind = 'boom'\n", "f.toml: faults[0].kind: unknown fault kind 'boom'; known: corrupt, dead, "
                                          "echo, garbage, late_reply, link_drop, no_reply, relay_stuck, truncated"),
    (BUS + "[[faults]]\nkind = 'no_reply'\nprobabilty = 0.5\n", "f.toml: faults[0].probabilty: unknown key"),
    (BUS + "[[faults]]\nkind = 'no_reply'\nprobability = 2\n",
     "f.toml: faults[0].probability: Input should be less than or equal to 1, got 2"),
    (BUS + "[[faults]]\nkind = 'no_reply'\ndelay_s = 2\n", "f.toml: faults[0]: delay_s goes with late_reply"),
    (BUS + "[[faults]]\nkind = 'dead'\nstart = 'soon'\n",
     "f.toml: faults[0].start: a time is UTC seconds or a TOML date-time, got 'soon'"),
]


@pytest.mark.parametrize(("text", "message"), BAD)
def test_bad_fleet_files_are_refused_with_the_key_path(text, message):
    with pytest.raises(FleetError) as caught:
        spec(text)
    assert str(caught.value) == message


CONFLICTS = [
    (BUS + BUS, "buses[1].name: bus name 'a' is already used by buses[0]"),
    (BUS + BUS.replace('"a"', '"b"'), "buses[1].meters: address 000000000001 is already on bus a"),
    (BUS.replace(":0", ":9000") + BUS.replace('"a"', '"b"').replace(":0", ":9000").replace("meters = 2", "meters = 2"
                                                                                           "\nfirst_address = 5"),
     "buses[1].tcp: 127.0.0.1:9000 is already used by bus a"),
    (BUS + "[[faults]]\nkind = 'dead'\nbus = 'nope'\n", "faults[0].bus: no bus named 'nope'"),
    (BUS + "[[faults]]\nkind = 'dead'\nmeter = '000000000009'\n",
     "faults[0].meter: no meter 000000000009 in the fleet"),
]


@pytest.mark.parametrize(("text", "message"), CONFLICTS)
def test_conflicts_across_the_fleet_name_the_key(text, message):
    with pytest.raises(FleetError) as caught:
        plan(spec(text))
    assert str(caught.value) == message


def test_check_and_serve_exit_2_with_a_clear_message(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(BUS + "baud = 'fast'\n")
    assert main(["check", str(bad)]) == 2
    assert capsys.readouterr().err == f"metersim: {bad}: buses[0].baud: Input should be a valid integer, got 'fast'\n"
    assert main(["serve", "--fleet", str(bad)]) == 2
    assert "buses[0].baud" in capsys.readouterr().err
    broken = tmp_path / "broken.toml"
    broken.write_text("[[buses]\n")
    assert main(["check", str(broken)]) == 2
    assert capsys.readouterr().err.startswith(f"metersim: {broken}: not valid TOML: ")
    assert main(["check", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read the fleet file: No such file or directory" in capsys.readouterr().err
    good = tmp_path / "good.toml"
    good.write_text(BUS)
    assert main(["check", str(good)]) == 0
    assert capsys.readouterr().out == f"{good}: 1 buses, 2 meters, 0 fault rules\n"


def flags(*argv: str):
    return fleet_from_args(parser().parse_args(["serve", *argv]))


def test_quick_flags_describe_one_bus():
    s = flags("--tcp", "127.0.0.1:0", "--meters", "5", "--first-address", "000000000100", "--edition", "1997",
              "--baud", "1200", "--reply-delay-ms", "10,30", "--fault", "no_reply=0.02", "--fault",
              "dead=000000000102", "--seed", "4", "--api", "127.0.0.1:0")
    fleet = build(s, now=NOW)
    (bus,) = fleet.buses
    assert (bus.name, min(bus.meters), max(bus.meters), len(bus.meters)) == (
        "bus1", "000000000100", "000000000104", 5)
    assert {m.edition for m in bus.meters.values()} == {1997}
    assert (bus.wire.baud, bus.wire.delay_min, bus.wire.delay_max) == (1200, 0.010, 0.030)
    assert [(r.kind, r.probability, r.meter) for r in fleet.faults.rules] == [
        ("no_reply", 0.02, None), ("dead", 1.0, "000000000102")]
    assert (s.seed, fleet.api) == (4, ("127.0.0.1", 0))
    pty = build(flags("--pty"), now=NOW)
    assert pty.endpoints["bus1"].options == {"link": None} and len(pty.buses[0].meters) == 1
    assert build(flags("--pty", "/tmp/l"), now=NOW).endpoints["bus1"].options == {"link": "/tmp/l"}
    dtu = build(flags("--dtu", "127.0.0.1:7000", "--registration", "hex:0102", "--heartbeat", "hb",
                      "--heartbeat-s", "3"), now=NOW)
    assert dtu.endpoints["bus1"].options == {"host": "127.0.0.1", "port": 7000, "registration": b"\x01\x02",
                                             "register_mode": "once", "heartbeat": b"hb", "heartbeat_s": 3.0,
                                             "reconnect_min": 1.0, "reconnect_max": 30.0}
    mqtt = build(flags("--mqtt", "mqtt://127.0.0.1", "--request-topic", "q", "--hex"), now=NOW)
    assert mqtt.endpoints["bus1"].options == {"url": "mqtt://127.0.0.1", "request_topic": "q",
                                              "response_topic": "metersim/bus1/response", "encoding": "hex",
                                              "reconnect_min": 1.0, "reconnect_max": 30.0}
    serial = build(flags("--serial", "/dev/ttyS1", "--baud", "9600"), now=NOW)
    assert serial.buses[0].wire.request_on_wire is False
    assert serial.endpoints["bus1"].options == {"device": "/dev/ttyS1", "baud": 9600, "parity": "E"}


def test_bad_quick_flags(tmp_path, capsys):
    with pytest.raises(FleetError, match=r"^give --fleet FILE or one exposure"):
        flags("--meters", "3")
    with pytest.raises(FleetError, match=r"^--fault boom=0\.1: unknown fault 'boom'"):
        flags("--tcp", "127.0.0.1:0", "--fault", "boom=0.1")
    with pytest.raises(FleetError, match=r"^flags: buses\[0\]\.meters: Input should be greater than or equal to 1"):
        flags("--tcp", "127.0.0.1:0", "--meters", "0")
    good = tmp_path / "f.toml"
    good.write_text(BUS)
    with pytest.raises(FleetError, match=r"^--meters, --baud: not with --fleet"):
        flags("--fleet", str(good), "--meters", "3", "--baud", "1200")
    s = flags("--fleet", str(good), "--fault", "echo=0.5", "--api", "127.0.0.1:0", "--seed", "9")
    assert (s.seed, s.api.listen, [f.kind for f in s.faults]) == (9, "127.0.0.1:0", ["echo"])
    for argv, text in ((["--tcp", "nohost"], "argument --tcp: expected HOST:PORT, got 'nohost'"),
                       (["--tcp", "127.0.0.1:0", "--first-address", "12"],
                        "argument --first-address: a meter address is 12 decimal digits, got '12'"),
                       (["--fleet", "x", "--tcp", "127.0.0.1:0"], "argument --tcp: not allowed with argument --fleet")):
        with pytest.raises(SystemExit) as exited:
            parser().parse_args(["serve", *argv])
        assert exited.value.code == 2
        assert text in capsys.readouterr().err


def test_faults_command_lists_every_kind(capsys):
    assert main(["faults"]) == 0
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == ["no_reply", "late_reply", "corrupt", "truncated",
                                                              "garbage", "echo", "dead", "link_drop", "relay_stuck"]
    assert "control is acknowledged but the relay does not move" in out
