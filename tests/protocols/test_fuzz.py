"""Fuzz smoke tests of the DL/T 645 codec: deterministic, seeded, ~10^5 inputs per target.

The contract under test: on any bytes, `parse` raises only `FrameError`;
`decode` of anything `parse` accepts raises only `DecodeError`; the meter
side's `parse_request` and `parse_control_payload` raise only `DecodeError`;
`Framer.feed` never raises, on any chunking, and holds back a bounded number
of bytes. Mutated valid frames (with the checksum fixed up afterwards) reach
the code behind the frame checks. Every target counts what it actually ran.
"""

from __future__ import annotations

import datetime as dt
import random
from collections import Counter

from protocols.dlt645 import (
    Action,
    Auth,
    DecodeError,
    Frame,
    FrameError,
    Framer,
    PlaintextBuilder,
    build,
    control_request,
    decode,
    error_reply,
    normal_reply,
    parse,
    parse_control_payload,
    parse_request,
    read_follow_up,
    read_reply,
    read_request,
    write_request,
)
from protocols.dlt645.frame import MAX_DATA, MIN_FRAME
from protocols.dlt645.framer import Accept
from protocols.dlt645.identifiers import TABLE_1997, TABLE_2007

SEED = 0x645_2007
INPUTS = 100_000
DIS_2007 = sorted(TABLE_2007)
DIS_1997 = sorted(TABLE_1997)
REPLY_CONTROLS = (0x91, 0xB1, 0x92, 0xB2, 0xD1, 0xD2, 0x81, 0xA1, 0x82, 0xA2, 0xC1, 0x83, 0x93, 0x94, 0x97,
                  0x98, 0x9C, 0x9D, 0xDC, 0x8C, 0x84)
REQUEST_CONTROLS = (0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18, 0x19, 0x1A, 0x1B, 0x1C, 0x1D, 0x01, 0x02,
                    0x03, 0x04, 0x08, 0x0A, 0x0C, 0x0F, 0x10)


def random_address(rng: random.Random) -> str:
    digits = f"{rng.randrange(10**12):012d}"
    k = rng.choice((0, 0, 0, 4, 6, 12))
    return "A" * k + digits[k:]


def random_item_frame(rng: random.Random) -> bytes:
    """A reply to a table item: DI + a payload near the item's width (short, exact, long)."""
    edition = rng.choice((2007, 2007, 2007, 1997))
    di = rng.choice(DIS_1997 if edition == 1997 else DIS_2007)
    item = (TABLE_1997 if edition == 1997 else TABLE_2007)[di]
    width = item.width if item.width is not None else rng.randrange(0, 120)
    size = max(0, min(190, width + rng.choice((0, 0, 0, -1, 1, -4, 4, rng.randrange(-width, 8) if width else 3))))
    payload = rng.randbytes(size) if rng.random() < 0.5 else bytes(rng.choice(b"\x00\x01\x09\x12\x45\x99\xff")
                                                                   for _ in range(size))
    frames = read_reply(random_address(rng), di, payload, edition, preamble=rng.randrange(5))
    return rng.choice(frames)


def random_request_frame(rng: random.Random) -> bytes:
    address = random_address(rng)
    auth = Auth(rng.randrange(100), f"{rng.randrange(10**6):06d}", f"{rng.randrange(10**8):08d}")
    kind = rng.randrange(6)
    if kind == 0:
        return read_request(address, rng.choice(DIS_2007 + DIS_1997) if rng.random() < 0.9 else rng.getrandbits(32))
    if kind == 1:
        return read_request(address, rng.choice(DIS_1997), 1997)
    if kind == 2:
        return read_follow_up(address, rng.choice(DIS_2007), rng.randrange(256))
    if kind == 3:
        return write_request(address, rng.getrandbits(32), rng.randbytes(rng.randrange(40)), auth)
    if kind == 4:
        deadline = dt.datetime(2000, 1, 1) + dt.timedelta(seconds=rng.randrange(3_155_000_000))
        return control_request(address, rng.choice(list(Action)), deadline, auth=auth)
    return build(address, rng.choice(REQUEST_CONTROLS), rng.randbytes(rng.randrange(24)))


def random_valid_frame(rng: random.Random) -> bytes:
    r = rng.random()
    if r < 0.4:
        return random_item_frame(rng)
    if r < 0.75:
        return random_request_frame(rng)
    if r < 0.85:
        return error_reply(random_address(rng), rng.randrange(32), rng.randrange(256))
    if r < 0.95:
        return normal_reply(random_address(rng), rng.randrange(32), rng.randbytes(rng.randrange(12)),
                            more=rng.random() < 0.3)
    return build(random_address(rng), rng.randrange(256), rng.randbytes(rng.randrange(MAX_DATA + 1)),
                 preamble=rng.randrange(5))


def fix_checksum(raw: bytearray, rng: random.Random) -> None:
    """Make the checksum (and usually the end byte) right again, wherever L now says they are."""
    i = len(raw) - len(bytes(raw).lstrip(b"\xfe"))
    if len(raw) - i < 10:
        return
    end = i + 10 + raw[i + 9]
    if end < len(raw):
        raw[end] = sum(raw[i:end]) & 0xFF
        if end + 1 < len(raw) and rng.random() < 0.9:
            raw[end + 1] = 0x16


def mutate(frame: bytes, rng: random.Random) -> bytes:
    raw = bytearray(frame)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        op = rng.randrange(7)
        pos = rng.randrange(len(raw) + 1)
        if op == 0 and raw:  # bit flip
            raw[pos % len(raw)] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert a byte (often a protocol-significant one)
            raw.insert(pos, rng.choice((0x68, 0x16, 0xFE, 0x33, 0x32, rng.randrange(256))))
        elif op == 2 and raw:  # delete a byte
            del raw[pos % len(raw)]
        elif op == 3 and raw:  # duplicate a slice
            cut = raw[pos : pos + rng.randrange(1, 16)]
            raw[pos:pos] = cut
        elif op == 4:  # truncate
            del raw[pos:]
        elif op == 5:  # change L, and make the data length agree with it half of the time
            i = len(raw) - len(bytes(raw).lstrip(b"\xfe"))
            if len(raw) - i >= 12:
                old, new = raw[i + 9], rng.choice((0, 1, 2, 3, 4, 5, 6, rng.randrange(256), raw[i + 9] + 1,
                                                   max(raw[i + 9] - 1, 0))) & 0xFF
                raw[i + 9] = new
                if rng.random() < 0.5:
                    data = raw[i + 10 : i + 10 + old]
                    raw[i + 10 : i + 10 + old] = (data + rng.randbytes(max(0, new - old)))[:new]
        else:  # overwrite a byte
            if raw:
                raw[pos % len(raw)] = rng.randrange(256)
    r = rng.random()
    if r < 0.35:
        repair(raw)
    elif r < 0.8:
        fix_checksum(raw, rng)
    return bytes(raw)


def repair(raw: bytearray) -> None:
    """Make the mutant a well-formed frame again (start bytes, L = what is there, CS, 16), content mutated."""
    i = len(raw) - len(bytes(raw).lstrip(b"\xfe"))
    if len(raw) - i < MIN_FRAME:
        return
    raw[i] = raw[i + 7] = 0x68
    size = min(MAX_DATA, len(raw) - i - MIN_FRAME)
    raw[i + 9] = size
    end = i + 10 + size
    raw[end] = sum(raw[i:end]) & 0xFF
    raw[end + 1] = 0x16
    del raw[end + 2 :]


def random_bytes(rng: random.Random) -> bytes:
    """0..300 random bytes; a third start like a frame header so parse gets past the start bytes."""
    n = rng.randrange(301)
    data = bytearray(rng.randbytes(n))
    if n >= MIN_FRAME and rng.random() < 0.33:
        k = rng.randrange(min(5, n - MIN_FRAME + 1))
        data[:k] = b"\xfe" * k
        data[k] = data[k + 7] = 0x68
        if rng.random() < 0.5:
            data[k + 9] = min(data[k + 9], n - k - MIN_FRAME)
            fix_checksum(data, rng)
    return bytes(data)


def check_parse(raw: bytes, seen: Counter[str]) -> Frame | None:
    try:
        frame = parse(raw)
    except FrameError as exc:
        seen[exc.reason] += 1
        return None
    seen["parsed"] += 1
    assert isinstance(frame, Frame)
    return frame


def check_decode(frame: Frame, seen: Counter[str]) -> None:
    try:
        reply = decode(frame)
    except DecodeError:
        seen["decode_error"] += 1
        return
    seen["decoded"] += 1
    assert reply.address == frame.address
    assert reply.control == frame.control
    if reply.values:
        seen["values"] += 1


def check_request(frame: Frame, seen: Counter[str]) -> None:
    try:
        request = parse_request(frame)
    except DecodeError:
        seen["request_error"] += 1
        return
    seen["request"] += 1
    assert request.function == frame.control & 0x1F
    if request.function == 0x1C and not frame.is_reply:
        check_control(request.body, seen)


def check_control(payload: bytes, seen: Counter[str]) -> None:
    try:
        parsed = parse_control_payload(payload)
    except DecodeError:
        seen["control_error"] += 1
        return
    seen["control"] += 1
    assert isinstance(parsed.auth, Auth)
    if parsed.deadline is not None:  # differential check: the builder gives back exactly these 16 bytes
        seen["control_rebuilt"] += 1
        rebuilt = PlaintextBuilder(parsed.auth, parsed.n2).payload("1", parsed.action, parsed.deadline)
        assert rebuilt == payload, (payload.hex(), rebuilt.hex())


def test_parse_random_bytes():
    rng, seen = random.Random(SEED), Counter()
    for _ in range(INPUTS):
        frame = check_parse(random_bytes(rng), seen)
        if frame is not None:
            check_decode(frame, seen)
            check_request(frame, seen)
    assert sum(seen[k] for k in ("parsed", "truncated", "bad_start", "bad_checksum", "bad_end",
                                 "trailing_bytes")) == INPUTS
    assert seen["parsed"] >= 1_000, seen  # some random inputs are frames and reach decode
    assert min(seen["bad_start"], seen["bad_checksum"], seen["truncated"]) > 1_000, seen


def test_parse_and_decode_mutated_frames():
    rng, seen = random.Random(SEED + 1), Counter()
    for _ in range(INPUTS):
        frame = check_parse(mutate(random_valid_frame(rng), rng), seen)
        if frame is not None:
            check_decode(frame, seen)
            check_request(frame, seen)
    assert sum(seen[k] for k in ("parsed", "truncated", "bad_start", "bad_checksum", "bad_end",
                                 "trailing_bytes")) == INPUTS
    assert seen["parsed"] >= 25_000, seen  # the checksum fix-up lets a good share through
    assert seen["decoded"] >= 10_000 and seen["values"] >= 5_000, seen
    assert seen["request"] >= 5_000, seen


def test_decode_and_parse_request_on_accepted_frames():
    """Valid frames (replies to table items with odd lengths, requests, errors), mostly unmutated."""
    rng, seen = random.Random(SEED + 2), Counter()
    for _ in range(INPUTS):
        raw = random_valid_frame(rng)
        if rng.random() < 0.3:
            raw = mutate(raw, rng)
        frame = check_parse(raw, seen)
        if frame is None:
            continue
        check_decode(frame, seen)
        check_request(frame, seen)
        # the same bytes the other way round: a request's data seen as a reply and vice versa
        flipped = frame._replace(control=frame.control ^ 0x80)
        check_decode(flipped, seen)
        check_request(flipped, seen)
    assert seen["decoded"] + seen["decode_error"] >= INPUTS, seen
    assert seen["request"] + seen["request_error"] >= INPUTS, seen
    assert seen["decoded"] >= 40_000 and seen["values"] >= 20_000, seen


def stream_pieces(rng: random.Random, count: int) -> bytes:
    pieces = []
    for _ in range(count):
        r = rng.random()
        if r < 0.35:
            pieces.append(random_valid_frame(rng))
        elif r < 0.7:
            pieces.append(mutate(random_valid_frame(rng), rng))
        elif r < 0.85:
            pieces.append(rng.randbytes(rng.randrange(40)) if rng.random() < 0.5 else random_bytes(rng))
        elif r < 0.95:
            pieces.append(b"\xfe" * rng.randrange(8))
        else:  # a stray 68 ahead of a frame
            pieces.append(b"\x68" + rng.randbytes(rng.randrange(12)))
    return b"".join(pieces)


def chunks(data: bytes, rng: random.Random) -> list[bytes]:
    mode = rng.randrange(4)
    if mode == 0:
        return [data]
    if mode == 1:  # byte by byte for a short prefix, then the rest
        k = rng.randrange(min(len(data), 64) + 1)
        return [data[i : i + 1] for i in range(k)] + [data[k:]]
    out, pos = [], 0
    while pos < len(data):
        size = rng.randrange(1, 300 if mode == 2 else 24)
        out.append(data[pos : pos + size])
        pos += size
    return out


def test_framer_never_raises_and_stays_bounded():
    rng, seen = random.Random(SEED + 3), Counter()
    pieces = 0
    while pieces < INPUTS:
        count = rng.randrange(1, 30)
        pieces += count
        stream = stream_pieces(rng, count)
        accept = rng.choice(list(Accept))
        framer = Framer(accept, max_buffer=rng.choice((4096, 4096, 300, 64)))
        for chunk in chunks(stream, rng):
            seen["bytes"] += len(chunk)
            for event in framer.feed(chunk):
                if isinstance(event, Frame):
                    seen["frames"] += 1
                    assert parse(wire_of(event)) == event
                    if accept is not Accept.ALL:
                        assert event.is_reply == (accept is Accept.REPLIES)
                else:
                    assert isinstance(event, FrameError)
                    seen[event.reason] += 1
            assert framer.pending <= framer.max_buffer
            assert framer.pending < MIN_FRAME + MAX_DATA
        for event in framer.flush():  # a frame held back behind a stray 68 comes out here
            if isinstance(event, Frame):
                assert parse(wire_of(event)) == event
                seen["frames_after_flush"] += 1
            else:
                assert isinstance(event, FrameError)
            seen["flushed"] += 1
        assert framer.pending == 0
        seen["streams"] += 1
    assert pieces >= INPUTS
    assert seen["bytes"] >= 1_000_000, seen
    assert seen["frames"] >= 20_000 and seen["bad_checksum"] >= 5_000 and seen["garbage"] >= 10_000, seen


def wire_of(frame: Frame) -> bytes:
    """The frame's bytes, built by hand (`Frame.to_bytes` refuses addresses with non-BCD nibbles)."""
    body = (b"\x68" + bytes.fromhex(frame.address)[::-1] + bytes((0x68, frame.control, len(frame.data)))
            + bytes((b + 0x33) & 0xFF for b in frame.data))
    return body + bytes((sum(body) & 0xFF, 0x16))


def bcd_byte(rng: random.Random) -> int:
    return rng.randrange(10) << 4 | rng.randrange(10)


def test_parse_control_payload_on_random_payloads():
    rng, seen = random.Random(SEED + 4), Counter()
    good = PlaintextBuilder(Auth(2, "123456", "00000001")).payload(
        "1", Action.TRIP, dt.datetime(2099, 12, 31, 23, 59, 59))
    for n in range(INPUTS):
        kind = n % 4
        if kind == 0:  # any 16 bytes
            payload = rng.randbytes(16)
        elif kind == 1:  # BCD where BCD belongs, anything in N1/N2: reaches the deadline check
            payload = bytes([*(bcd_byte(rng) for _ in range(8)), rng.randrange(256), rng.randrange(256),
                             *(bcd_byte(rng) for _ in range(6))])
        elif kind == 2:  # a valid payload with one or two bytes changed
            raw = bytearray(good)
            for _ in range(rng.randrange(1, 3)):
                raw[rng.randrange(16)] = rng.randrange(256)
            payload = bytes(raw)
        else:  # the wrong length
            payload = rng.randbytes(rng.choice((0, 1, 8, 15, 17, 32)))
        check_control(payload, seen)
    assert seen["control"] + seen["control_error"] == INPUTS
    assert seen["control"] >= 20_000 and seen["control_rebuilt"] >= 1_000, seen
    assert seen["control_error"] >= 30_000, seen
