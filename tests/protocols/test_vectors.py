"""Every frame of the reference's §4 (public captures and library tests) decodes as the table says."""

from __future__ import annotations

import datetime as dt

import pytest

from protocols.dlt645 import (
    Action,
    Error1997,
    Error2007,
    build,
    decode,
    parse,
    parse_control_payload,
    parse_request,
    read_address_request,
    read_request,
)


def h(text: str) -> bytes:
    return bytes.fromhex(text)


READS = [
    # (vector, hex, address, DI, edition)
    ("V01", "68 03 20 12 22 20 65 68 11 04 33 33 33 33 8D 16", "652022122003", 0x00000000, 2007),
    ("V03", "FE FE FE FE 68 18 20 12 22 20 65 68 11 04 33 32 34 35 A4 16", "652022122018", 0x0201FF00, 2007),
    ("V05", "68 25 04 03 02 01 00 68 11 04 33 33 34 33 E1 16", "000102030425", 0x00010000, 2007),
    ("V08", "68 03 00 00 00 00 00 68 01 02 44 E9 03 16", "000000000003", 0xB611, 1997),
    ("V10", "68 90 78 56 34 12 00 68 11 04 33 33 33 33 55 16", "001234567890", 0x00000000, 2007),
    ("V11", "68 78 56 34 12 00 00 68 11 04 33 34 34 35 C9 16", "000012345678", 0x02010100, 2007),
]


@pytest.mark.parametrize(("name", "wire", "address", "di", "edition"), READS, ids=[r[0] for r in READS])
def test_read_requests_parse_and_rebuild(name, wire, address, di, edition):
    frame = parse(h(wire))
    request = parse_request(frame)
    assert (frame.address, request.di, request.edition) == (address, di, edition)
    preamble = 4 if wire.startswith("FE") else 0
    assert read_request(address, di, edition, preamble=preamble) == h(wire)


REPLIES = [
    ("V02", "68 03 20 12 22 20 65 68 91 08 33 33 33 33 33 33 33 33 DD 16", "652022122003", 2007,
     {"combined_active_energy": (0.0, "kWh")}),
    ("V04", "FE FE FE FE 68 18 20 12 22 20 65 68 91 0A 33 32 34 35 33 33 33 33 C7 56 13 16", "652022122018",
     2007, {"voltage_a": (0.0, "V"), "voltage_b": (0.0, "V"), "voltage_c": (239.4, "V")}),
    ("V06", "68 25 04 03 02 01 00 68 91 08 33 33 34 33 75 39 45 33 8B 16", "000102030425", 2007,
     {"forward_active_energy": (1206.42, "kWh")}),
    ("V09", "68 03 00 00 00 00 00 68 81 04 44 E9 33 34 EC 16", "000000000003", 1997, {"voltage_a": (100.0, "V")}),
    ("V13", "FE FE FE FE 68 00 51 44 18 11 17 68 91 06 35 33 B3 35 36 83 45 16", "171118445100", 2007,
     {"frequency": (50.03, "Hz")}),
]


@pytest.mark.parametrize(("name", "wire", "address", "edition", "expected"), REPLIES, ids=[r[0] for r in REPLIES])
def test_replies_decode_to_the_published_values(name, wire, address, edition, expected):
    reply = decode(parse(h(wire)))
    assert reply.address == address
    assert reply.edition == edition
    assert reply.ok and reply.complete and not reply.more
    assert {k: (q.value, q.unit) for k, q in reply.values.items()} == expected


def test_v07_read_address_wildcard():
    frame = parse(h("FE FE FE 68 AA AA AA AA AA AA 68 13 00 DF 16"))
    assert (frame.address, frame.control, frame.data) == ("AAAAAAAAAAAA", 0x13, b"")
    assert read_address_request(preamble=3) == h("FE FE FE 68 AA AA AA AA AA AA 68 13 00 DF 16")


def test_v12_library_quirk_1997_di_with_2007_read_code():
    request = parse_request(parse(h("68 67 45 23 01 00 00 68 11 02 44 E9 E0 16")))
    assert (request.address, request.edition, request.di) == ("000001234567", 1997, 0xB611)


def test_v21_trip_command():
    frame = parse(h("68 11 11 11 11 11 11 68 1C 10 33 33 33 33 33 33 33 33 4D 33 57 74 48 45 38 4B 55 16"))
    payload = parse_control_payload(frame.data)
    assert frame.address == "111111111111"
    assert payload.action is Action.TRIP
    assert (payload.auth.level, payload.auth.password, payload.auth.operator) == (0, "000000", "00000000")
    assert payload.n2 == 0
    assert payload.deadline == dt.datetime(2018, 5, 12, 15, 41, 24)


def test_v22_meter_accepts_control():
    reply = decode(parse(h("68 11 11 11 11 11 11 68 9C 00 D2 16")))
    assert reply.ok and reply.function == 0x1C and reply.values == {}


def test_abnormal_reply_bits_combine_and_differ_by_edition():
    reply = decode(parse(build("111111111111", 0xD1, b"\x06")))
    assert reply.error == Error2007.NO_DATA | Error2007.UNAUTHORIZED
    old = decode(parse(build("111111111111", 0xC1, b"\x03")))
    assert old.edition == 1997
    assert old.error == Error1997.ILLEGAL_DATA | Error1997.BAD_DI


def test_unknown_di_decodes_to_raw_bytes():
    reply = decode(parse(build("000000000001", 0x91, bytes.fromhex("11 22 80 02 01 02 03"))))
    assert reply.item is None
    assert reply.values == {"02802211": ("010203", "", ("raw",))}  # wire order, untouched


def test_a_length_that_differs_from_the_table_is_tolerated_and_flagged():
    # A meter answering a 2-byte voltage with 3 bytes (seen in the field).
    reply = decode(parse(build("000000000001", 0x91, bytes.fromhex("00 01 01 02 94 23 00"))))
    assert not reply.complete
    assert reply.values["voltage_a"].value == 239.4
