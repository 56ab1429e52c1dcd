"""Request builders put every field where the reference says, for both editions."""

from __future__ import annotations

import datetime as dt

import pytest

from protocols.dlt645 import (
    Action,
    Auth,
    EncodeError,
    PlaintextBuilder,
    RelayStatus,
    broadcast_time_request,
    change_baud_request,
    change_password_request,
    clear_demand_request,
    clear_events_request,
    clear_meter_request,
    control_request,
    freeze_request,
    output_request,
    parse,
    read_follow_up,
    read_request,
    reread_request,
    write_address_request,
    write_request,
)

ADDR = "000102030425"
AUTH = Auth(level=2, password="123456", operator="00000001")


def body(wire: bytes) -> tuple[str, int, bytes]:
    frame = parse(wire)
    return frame.address, frame.control, frame.data


def test_v21_is_rebuilt_byte_for_byte():
    wire = control_request("111111111111", Action.TRIP, dt.datetime(2018, 5, 12, 15, 41, 24), auth=Auth(0))
    assert wire == bytes.fromhex("68 11 11 11 11 11 11 68 1C 10 33 33 33 33 33 33 33 33 4D 33 57 74 48 45 38 4B 55 16")


def test_control_payload_layout_and_n2():
    wire = control_request(ADDR, Action.CLOSE, dt.datetime(2026, 11, 22, 9, 30, 5),
                           builder=PlaintextBuilder(AUTH, n2=1))
    _, control, data = body(wire)
    assert control == 0x1C
    assert data == bytes.fromhex("02 56 34 12 01 00 00 00 1C 01 05 30 09 22 11 26")


def test_password_is_not_in_repr():
    assert "123456" not in repr(AUTH)
    assert "123456" not in repr(PlaintextBuilder(AUTH))


def test_broadcast_time_sync_is_seconds_first_to_99():
    address, control, data = body(broadcast_time_request(dt.datetime(2026, 11, 22, 23, 59, 58)))
    assert (address, control, data) == ("999999999999", 0x08, bytes.fromhex("58 59 23 22 11 26"))


def test_freeze_is_minutes_first_with_99_for_periodic():
    assert body(freeze_request(ADDR, minute=10, hour=0))[2] == bytes.fromhex("10 00 99 99")
    assert body(freeze_request("999999999999"))[2] == bytes.fromhex("99 99 99 99")


@pytest.mark.parametrize(("baud", "z"), [(1200, 0x04), (2400, 0x08), (4800, 0x10), (9600, 0x20), (19200, 0x40)])
def test_baud_feature_word_is_one_bit(baud, z):
    assert body(change_baud_request(ADDR, baud)) == (ADDR, 0x17, bytes([z]))
    assert body(change_baud_request(ADDR, baud, 1997))[1] == 0x0C


def test_load_profile_read_forms():
    assert body(read_request(ADDR, 0x06000000, count=12))[2] == bytes.fromhex("00 00 00 06 12")
    start = dt.datetime(2026, 11, 21, 13, 45)
    assert body(read_request(ADDR, 0x06000001, count=1, start=start))[2] == bytes.fromhex(
        "01 00 00 06 01 45 13 21 11 26")
    with pytest.raises(EncodeError):
        read_request(ADDR, 0x06000001, start=start)


def test_follow_up_and_reread():
    assert body(read_follow_up(ADDR, 0x0506FF01, 3)) == (ADDR, 0x12, bytes.fromhex("01 FF 06 05 03"))
    assert body(read_follow_up(ADDR, 0x901F, 0, 1997)) == (ADDR, 0x02, bytes.fromhex("1F 90"))
    assert body(reread_request(ADDR)) == (ADDR, 0x03, b"")


def test_write_carries_operator_code_in_2007_only():
    assert body(write_request(ADDR, 0x04000102, b"\x00\x30\x12", AUTH))[2] == bytes.fromhex(
        "02 01 00 04 02 56 34 12 01 00 00 00 00 30 12")
    assert body(write_request(ADDR, 0xC011, b"\x00\x30\x12", AUTH, 1997)) == (
        ADDR, 0x04, bytes.fromhex("11 C0 02 56 34 12 00 30 12"))


def test_write_address_targets_wildcard_2007_and_broadcast_1997():
    assert body(write_address_request("000000000042")) == ("AAAAAAAAAAAA", 0x15, bytes.fromhex("42 00 00 00 00 00"))
    assert body(write_address_request("000000000042", 1997))[:2] == ("999999999999", 0x0A)


def test_password_change_clear_and_output():
    new = Auth(level=4, password="654321")
    assert body(change_password_request(ADDR, AUTH, new))[1:] == (
        0x18, bytes.fromhex("05 0C 00 04 02 56 34 12 04 21 43 65"))
    assert body(change_password_request(ADDR, AUTH, new, 1997))[1:] == (0x0F, bytes.fromhex("02 56 34 12 04 21 43 65"))
    assert body(clear_demand_request(ADDR, AUTH))[1:] == (0x19, bytes.fromhex("02 56 34 12 01 00 00 00"))
    assert body(clear_demand_request(ADDR, AUTH, 1997))[1:] == (0x10, bytes.fromhex("02 56 34 12"))
    assert body(clear_meter_request(ADDR, AUTH))[1] == 0x1A
    assert body(clear_events_request(ADDR, AUTH, 0x03300DFF))[1:] == (
        0x1B, bytes.fromhex("02 56 34 12 01 00 00 00 FF 0D 30 03"))
    assert body(output_request(ADDR, 2)) == (ADDR, 0x1D, b"\x02")


def test_bad_arguments_are_typed_errors():
    with pytest.raises(EncodeError):
        Auth(password="12345")
    with pytest.raises(EncodeError):
        change_baud_request(ADDR, 2401)
    with pytest.raises(EncodeError):
        read_request(ADDR, 0x1_0000_0000)
    with pytest.raises(EncodeError):
        read_request(ADDR, 0x10000, 1997)
    with pytest.raises(ValueError, match="12 digits"):
        read_request("12345678901234", 0)


@pytest.mark.parametrize(("word", "action", "ok"), [
    (0x0010 | 0x0040, Action.TRIP, True),       # open, trip commanded
    (0x0040 | 0x0080, Action.TRIP, False),      # trip delay running: commanded, alarm, still closed
    (0x0010, Action.ALLOW_CLOSE, True),         # command cleared, waiting for the button
    (0x0010, Action.CLOSE, False),
    (0x0000, Action.CLOSE, True),
    (0x1000, Action.HOLD, True),
    (0x0000, Action.HOLD_RELEASE, True),
])
def test_relay_status_from_status_word_3(word, action, ok):
    assert RelayStatus.from_word(word).satisfies(action) is ok


def test_cached_plain_reads_are_the_built_frames_and_errors_stay_errors():
    from protocols.dlt645.requests import build_read_request  # noqa: PLC0415

    for address, di, edition, preamble in (("000102030425", 0x00010000, 2007, 4), ("12", 0x9010, 1997, 0),
                                           ("AAAAAAAAAAAA", 0x0201FF00, 2007, 0)):
        first = read_request(address, di, edition, preamble=preamble)
        assert first == read_request(address, di, edition, preamble=preamble)
        assert first == build_read_request(address, di, edition, preamble=preamble)
    for _ in range(2):  # an error is raised every time, never cached as a frame
        with pytest.raises(EncodeError):
            read_request("000102030425", 0x1_0000, 1997)
