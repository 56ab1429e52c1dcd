"""The stream framer against what real lines do to frames."""

from __future__ import annotations

from protocols.dlt645 import (
    Accept,
    BadChecksum,
    Frame,
    Framer,
    Garbage,
    TruncatedFrame,
    build,
    parse,
    read_request,
)

REPLY = bytes.fromhex("68 25 04 03 02 01 00 68 91 08 33 33 34 33 75 39 45 33 8B 16")
FRAME = parse(REPLY)


def frames(events):
    return [e for e in events if isinstance(e, Frame)]


def feed_all(framer, chunks):
    events = []
    for chunk in chunks:
        events += framer.feed(chunk)
    return events


def test_preamble_and_trailing_fe_are_not_garbage():
    framer = Framer()
    events = framer.feed(b"\xfe" * 4 + REPLY + b"\xfe\xfe")
    assert events == [FRAME]
    assert framer.stats["garbage_bytes"] == 0
    assert framer.pending == 0


def test_garbage_before_a_frame_is_reported_then_the_frame():
    framer = Framer()
    events = framer.feed(b"\x00\x11\x22" + REPLY)
    assert isinstance(events[0], Garbage) and events[0].data == b"\x00\x11\x22"
    assert events[1:] == [FRAME]
    assert framer.stats["garbage_bytes"] == 3


def test_0x16_0xfe_and_0x68_inside_a_frame():
    # A value whose scrambled bytes are 16, FE and 68, and a checksum that is itself 16 or FE.
    for data in (bytes([0x16 - 0x33 & 0xFF, 0xFE - 0x33 & 0xFF, 0x68 - 0x33]), b"\x16\x16\xfe\xfe\x68"):
        wire = build("161616161616", 0x91, data)
        assert frames(Framer().feed(wire)) == [parse(wire)]
    fe_checksum = next(build("000000000001", 0x91, bytes([k])) for k in range(256)
                       if build("000000000001", 0x91, bytes([k]))[-2] == 0xFE)
    assert frames(Framer().feed(b"\xfe\xfe" + fe_checksum + b"\xfe")) == [parse(fe_checksum)]


def test_a_frame_split_into_single_bytes():
    framer = Framer()
    events = feed_all(framer, [bytes([b]) for b in b"\xfe\xfe" + REPLY])
    assert events == [FRAME]


def test_two_frames_in_one_read_and_one_and_a_half():
    other = build("000000000002", 0x91, b"\x02\x00\x80\x02\x00\x50")
    framer = Framer()
    assert framer.feed(REPLY + other + REPLY[:7]) == [FRAME, parse(other)]
    assert framer.pending == 7
    assert framer.feed(REPLY[7:]) == [FRAME]


def test_bad_checksum_is_reported_and_the_next_frame_still_found():
    broken = bytearray(REPLY)
    broken[-2] ^= 0xFF
    framer = Framer()
    events = framer.feed(bytes(broken) + REPLY)
    assert isinstance(events[0], BadChecksum)
    assert frames(events) == [FRAME]
    assert framer.stats["bad_checksum"] == 1


def test_resync_finds_a_frame_that_starts_inside_a_bad_candidate():
    # A stray 68 that looks like a header (68 at +7) swallows the real frame's start.
    junk = bytes.fromhex("68 00 00 00 00 00 00")
    framer = Framer()
    events = framer.feed(junk + REPLY)
    assert frames(events) == [FRAME]


def test_doubled_start_byte():
    framer = Framer()
    events = framer.feed(b"\x68" + REPLY)
    assert frames(events) == [FRAME]
    assert framer.stats["garbage_bytes"] == 1


def test_stray_68_with_a_huge_fake_length_does_not_hide_a_complete_frame():
    fake = bytes.fromhex("68 01 02 03 04 05 06 68 91 FF")  # would need 257 more bytes
    framer = Framer()
    assert framer.feed(fake + REPLY) == []  # it could still be a long frame...
    events = framer.flush()  # ...until the line goes quiet
    assert isinstance(events[0], TruncatedFrame) and events[0].data == fake
    assert events[1:] == [FRAME]
    assert framer.pending == 0


def test_truncated_frame_is_reported_when_the_line_goes_quiet():
    framer = Framer()
    assert framer.feed(REPLY[:15]) == []
    events = framer.flush()
    assert len(events) == 1 and isinstance(events[0], TruncatedFrame)
    assert framer.stats["truncated"] == 1
    assert framer.feed(REPLY) == [FRAME]  # and the next frame is clean


def test_local_echo_of_our_request_is_dropped_on_the_master_side():
    request = read_request("000102030425", 0x00010000, preamble=4)
    framer = Framer(Accept.REPLIES)
    assert framer.feed(request + REPLY) == [FRAME]
    assert framer.stats["echo"] == 1
    meter_side = Framer(Accept.REQUESTS)
    assert frames(meter_side.feed(request + REPLY)) == [parse(request)]


def test_buffer_is_bounded_under_endless_partial_input():
    framer = Framer(max_buffer=512)
    header = bytes.fromhex("68 01 02 03 04 05 06 68 91 FF")
    for _ in range(100):
        framer.feed(header + b"\x00" * 100)
        assert framer.pending <= 512
