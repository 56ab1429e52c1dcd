"""A simulated meter answers like a real one, with readings that agree with each other."""

from __future__ import annotations

import datetime as dt

import pytest

from protocols.dlt645 import (
    Action,
    Auth,
    Error1997,
    Error2007,
    ReadSequence,
    RelayStatus,
    Reply,
    broadcast_time_request,
    change_password_request,
    clear_meter_request,
    control_request,
    decode,
    find,
    parse,
    read_address_request,
    read_request,
    write_request,
)
from simulators.meter import Meter

NOW = dt.datetime(2026, 11, 22, 6, 0, tzinfo=dt.UTC).timestamp()  # 14:00 in UTC+8
LOCAL = dt.datetime(2026, 11, 22, 14, 0)
ADDR = "000000000007"


@pytest.fixture
def meter() -> Meter:
    return Meter(ADDR, epoch=NOW - 70 * 86400, now=NOW, passwords={2: "123456", 4: "000000"})


def ask(meter: Meter, wire: bytes, now: float = NOW) -> Reply | None:
    out = meter.answer(parse(wire), now)
    return decode(parse(out[0])) if out else None


def read(meter: Meter, name: str, now: float = NOW, edition: int = 2007) -> dict:
    """A complete read, following up while the meter says more frames come."""
    sequence = ReadSequence(meter.address, find(name, edition).di, edition)
    request: bytes | None = sequence.request
    while request is not None:
        out = meter.answer(parse(request), now)
        assert out, f"no answer to {name}"
        request = sequence.feed(decode(parse(out[0])))
    reply = sequence.reply
    assert reply is not None and reply.ok, reply
    assert reply.complete
    return {k: q.value for k, q in reply.values.items()}


def control(meter: Meter, action: Action, now: float = NOW, *, password: str = "123456",
            deadline: dt.datetime | None = None) -> Reply:
    wire = control_request(meter.address, action, deadline or LOCAL + dt.timedelta(minutes=10),
                           auth=Auth(2, password, "12345678"))
    reply = ask(meter, wire, now)
    assert reply is not None
    return reply


def relay(meter: Meter, now: float = NOW) -> RelayStatus:
    return RelayStatus.from_word(read(meter, "status_word_3", now)["status_word_3"])


def test_energy_block_agrees_with_total_and_never_goes_backwards(meter):
    block = read(meter, "forward_active_energy_block")
    tariffs = [block[f"forward_active_energy_t{k}"] for k in range(1, 5)]
    assert abs(sum(tariffs) - block["forward_active_energy"]) < 0.05
    previous = 0.0
    for step in range(0, 3 * 86400, 3607):
        value = read(meter, "forward_active_energy", NOW + step)["forward_active_energy"]
        assert value >= previous
        previous = value
    a = read(meter, "forward_active_energy", NOW)["forward_active_energy"]
    b = read(meter, "forward_active_energy", NOW + 1)["forward_active_energy"]
    assert b >= a


def test_instantaneous_values_agree_with_each_other(meter):
    v = read(meter, "voltage_a")["voltage_a"]
    i = read(meter, "current_a")["current_a"]
    p = read(meter, "active_power")["active_power"]
    pf = read(meter, "power_factor")["power_factor"]
    assert 210 < v < 230
    assert 0.9 <= pf < 1.0
    assert p > 0
    assert abs(v * i * pf / 1000 - p) < 0.01 * p + 0.002
    assert 49.9 < read(meter, "frequency")["frequency"] < 50.1


def test_energy_integrates_the_power(meter):
    meter.set_load(2.0, NOW)
    e0 = read(meter, "forward_active_energy", NOW)["forward_active_energy"]
    e1 = read(meter, "forward_active_energy", NOW + 1800)["forward_active_energy"]
    assert e1 - e0 == pytest.approx(1.0, abs=0.011)
    assert read(meter, "active_power", NOW + 10)["active_power"] == 2.0


def test_daily_freeze_holds_the_registers_at_local_midnight(meter):
    freeze = read(meter, "daily_freeze_last1")
    assert freeze["daily_freeze_time_last1"] == dt.datetime(2026, 11, 22, 0, 0)
    midnight_utc = dt.datetime(2026, 11, 21, 16, 0, tzinfo=dt.UTC).timestamp()
    live = read(meter, "forward_active_energy_block", midnight_utc)
    assert freeze["forward_active_energy"] == live["forward_active_energy"]
    assert freeze["forward_active_energy_t4"] == live["forward_active_energy_t4"]
    assert read(meter, "daily_freeze_time_last62")["daily_freeze_time_last62"] == dt.datetime(2026, 9, 22)
    older = read(meter, "daily_freeze_forward_active_energy_last2")["forward_active_energy"]
    assert older < freeze["forward_active_energy"]
    assert read(meter, "hourly_freeze_time_last1")["hourly_freeze_time_last1"] == LOCAL


def test_meter_without_data_answers_no_data(meter):
    reply = ask(meter, read_request(ADDR, 0x02809999))
    assert reply is not None and reply.error == Error2007.NO_DATA
    assert ask(meter, read_request("000000000099", 0x00010000)) is None  # not addressed: silence
    beyond = ask(meter, read_request(ADDR, 0x00010900))  # tariff 9 of a 4-tariff meter
    assert beyond is not None and beyond.error == Error2007.NO_DATA


def test_identity_clock_and_events(meter):
    assert read(meter, "address")["address"] == ADDR
    assert read(meter, "meter_number")["meter_number"] == ADDR
    assert read(meter, "date")["date"] == LOCAL.date()
    assert read(meter, "time")["time"] == LOCAL.time()
    reply = ask(meter, read_address_request())
    assert reply is not None and reply.values["address"].value == ADDR
    count = read(meter, "power_down_count")["power_down_count"]
    if count:
        record = read(meter, "power_down_record_last1")
        assert record["power_down_start"] < record["power_down_end"] <= LOCAL


def test_time_sync_and_clock_write(meter):
    assert ask(meter, broadcast_time_request(LOCAL + dt.timedelta(minutes=5))) is None  # broadcast: no reply
    assert read(meter, "time")["time"] == (LOCAL + dt.timedelta(minutes=5)).time()
    value = find("time").fields[0].fmt.encode(dt.time(13, 0, 0))
    assert ask(meter, write_request(ADDR, 0x04000102, value, Auth(2, "999999"))).error == Error2007.UNAUTHORIZED
    assert ask(meter, write_request(ADDR, 0x04000102, value, Auth(2, "123456"))).ok
    assert read(meter, "time", NOW + 60)["time"] == dt.time(13, 1, 0)


def test_trip_opens_relay_stops_load_and_records_it(meter):
    assert control(meter, Action.TRIP).ok
    status = relay(meter)
    assert status.relay_open and status.trip_commanded
    assert read(meter, "active_power")["active_power"] == 0.0
    e0 = read(meter, "forward_active_energy", NOW)["forward_active_energy"]
    assert read(meter, "forward_active_energy", NOW + 7200)["forward_active_energy"] == e0
    assert read(meter, "trip_count")["trip_count"] == 1
    record = read(meter, "trip_record_last1")
    assert record["trip_operator"] == "12345678"
    assert record["trip_time"] == LOCAL


def test_trip_delay_shows_command_and_alarm_before_the_relay_opens(meter):
    meter.relay.trip_delay_s = 300
    assert control(meter, Action.TRIP).ok
    during = relay(meter, NOW + 10)
    assert during.trip_commanded and during.pre_trip_alarm and not during.relay_open
    assert read(meter, "active_power", NOW + 10)["active_power"] > 0
    after = relay(meter, NOW + 301)
    assert after.relay_open and not after.pre_trip_alarm


def test_allow_close_waits_for_the_button_and_direct_close_does_not(meter):
    control(meter, Action.TRIP)
    assert control(meter, Action.ALLOW_CLOSE, NOW + 60).ok
    waiting = relay(meter, NOW + 61)
    assert waiting.relay_open and not waiting.trip_commanded
    assert waiting.satisfies(Action.ALLOW_CLOSE)
    assert meter.relay.press_button(meter, NOW + 120)
    assert not relay(meter, NOW + 121).relay_open
    assert read(meter, "active_power", NOW + 121)["active_power"] > 0
    control(meter, Action.TRIP, NOW + 200)
    assert control(meter, Action.CLOSE, NOW + 260).ok
    assert not relay(meter, NOW + 261).relay_open
    assert read(meter, "close_count", NOW + 261)["close_count"] == 2


def test_alarm_and_hold(meter):
    assert control(meter, Action.ALARM).ok
    assert relay(meter).pre_trip_alarm
    assert control(meter, Action.ALARM_RELEASE).ok
    assert not relay(meter).pre_trip_alarm
    assert control(meter, Action.HOLD).ok
    assert relay(meter).hold
    refused = control(meter, Action.TRIP)
    assert refused.error is not None and not relay(meter).relay_open
    assert control(meter, Action.HOLD_RELEASE).ok
    assert control(meter, Action.TRIP).ok
    assert relay(meter).relay_open


def test_wrong_password_and_past_deadline_are_refused(meter):
    assert control(meter, Action.TRIP, password="000001").error == Error2007.UNAUTHORIZED
    late = control(meter, Action.TRIP, deadline=LOCAL - dt.timedelta(seconds=1))
    assert late.error == Error2007.OTHER
    assert not relay(meter).relay_open
    # The deadline is judged by the meter's clock: a meter running 20 minutes fast refuses.
    meter.set_clock(LOCAL + dt.timedelta(minutes=20), NOW)
    assert control(meter, Action.TRIP).error == Error2007.OTHER


def test_relay_stuck_acknowledges_but_nothing_moves(meter):
    meter.relay_stuck = True
    assert control(meter, Action.TRIP).ok
    assert not relay(meter).relay_open


def test_password_change_and_meter_clear(meter):
    assert ask(meter, change_password_request(ADDR, Auth(2, "123456"), Auth(2, "654321"))).ok
    assert control(meter, Action.ALARM, password="123456").error == Error2007.UNAUTHORIZED
    assert control(meter, Action.ALARM, password="654321").ok
    assert ask(meter, clear_meter_request(ADDR, Auth(2, "654321"))).ok
    assert read(meter, "forward_active_energy")["forward_active_energy"] == 0.0
    assert read(meter, "meter_clear_count")["meter_clear_count"] == 1


def test_long_answer_comes_in_follow_up_frames(meter):
    sequence = ReadSequence(ADDR, find("daily_freeze_last1").di)
    request: bytes | None = sequence.request
    frames = 0
    while request is not None:
        out = meter.answer(parse(request), NOW)
        frames += 1
        request = sequence.feed(decode(parse(out[0])))
    assert frames == 2
    assert sequence.reply is not None and sequence.reply.complete
    assert sequence.reply.values["daily_freeze_time_last1"].value == dt.datetime(2026, 11, 22)
    assert len(sequence.reply.payload) > 200


def test_1997_meter_speaks_its_own_codes():
    old = Meter("000000000003", edition=1997, epoch=NOW - 70 * 86400, now=NOW)
    values = read(old, "forward_active_energy_block", edition=1997)
    assert set(values) >= {"forward_active_energy", "forward_active_energy_t4"}
    assert 210 < read(old, "voltage_a", edition=1997)["voltage_a"] < 230
    out = old.answer(parse(read_request("000000000003", 0x9999, 1997)), NOW)
    reply = decode(parse(out[0]))
    assert reply.edition == 1997 and reply.error == Error1997.BAD_DI
    assert parse(out[0]).control == 0xC1
