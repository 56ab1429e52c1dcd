"""Property tests of the DL/T 645 codec (hypothesis).

Each property states a round trip or an invariant over random inputs:
frame build/parse (and the hot path against the construct spec), the stream
framer under arbitrary chunking, every value format, every DI in the table,
the request builders against the meter-side parser, and multi-frame reads.
"""

from __future__ import annotations

import datetime as dt
import itertools
import random

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from protocols.dlt645 import (
    INVALID,
    Accept,
    Action,
    Auth,
    EncodeError,
    Frame,
    Framer,
    Garbage,
    PlaintextBuilder,
    Quantity,
    ReadSequence,
    build,
    control_request,
    decode,
    normalize,
    parse,
    parse_control_payload,
    parse_request,
    read_follow_up,
    read_reply,
    read_request,
    spec,
    write_request,
)
from protocols.dlt645.formats import Ascii, Bcd, Binary, Digits, Format, Raw, Time
from protocols.dlt645.frame import MAX_DATA, MIN_FRAME
from protocols.dlt645.identifiers import TABLE_1997, TABLE_2007, lookup
from protocols.dlt645.items import DataItem, Field

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MEDIUM = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
WIDE = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TIME_PATTERNS = ("YYMMDDhhmm", "YYMMDDhhmmss", "YYMMDDWW", "hhmmss", "MMDDhhmm", "DDhh")
DATETIMES = st.datetimes(min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2099, 12, 31, 23, 59, 59))
DIGITS = "0123456789"


# --- strategies -----------------------------------------------------------------------------------

@st.composite
def addresses(draw) -> str:
    """12 digits, short (zero-padded) nameplates, and high digits replaced by A / a wildcard nibbles."""
    digits = draw(st.text(DIGITS, min_size=1, max_size=12))
    if len(digits) == 12 and draw(st.booleans()):
        k = draw(st.integers(0, 12))
        digits = draw(st.sampled_from("Aa")) * k + digits[k:]
    return digits


def sized_binary(max_size: int) -> st.SearchStrategy[bytes]:
    """Bytes whose length is drawn first, so long values are as likely as short ones."""
    return st.integers(0, max_size).flatmap(lambda n: st.binary(min_size=n, max_size=n))


controls = st.integers(0, 255)
payloads = sized_binary(MAX_DATA)
preambles = st.integers(0, 4)


def no_68(data: bytes) -> bytes:
    return data.replace(b"\x68", b"\x00")


def bcd_limit(fmt: Bcd) -> int:
    """The largest magnitude (in units of the last digit) the format holds."""
    return 8 * 10 ** (2 * fmt.width - 1) - 1 if fmt.signed else 10 ** (2 * fmt.width) - 1


def bcd_value(fmt: Bcd, n: int) -> int | float:
    return n / 10**fmt.decimals if fmt.real else n


def time_expected(pattern: str, when: dt.datetime) -> object:
    """What `Time(pattern).decode(Time(pattern).encode(when))` must give."""
    when = when.replace(microsecond=0)
    return {
        "YYMMDDhhmm": when.replace(second=0),
        "YYMMDDhhmmss": when,
        "YYMMDDWW": when.date(),
        "hhmmss": when.time(),
        "MMDDhhmm": f"{when.month:02d}-{when.day:02d} {when.hour:02d}:{when.minute:02d}",
        "DDhh": f"{when.day:02d} {when.hour:02d}",
    }[pattern]


ASCII_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=32)


def value_strategy(fmt: Format) -> st.SearchStrategy[tuple[object, object]]:
    """(value to encode, value decode must give) for one format."""
    if isinstance(fmt, Bcd):
        limit = bcd_limit(fmt)
        return st.integers(-limit if fmt.signed else 0, limit).map(
            lambda n: (bcd_value(fmt, n), bcd_value(fmt, n)))
    if isinstance(fmt, Digits):
        return st.text(DIGITS, min_size=2 * fmt.width, max_size=2 * fmt.width).map(lambda s: (s, s))
    if isinstance(fmt, Binary):
        return st.integers(0, 2 ** (8 * fmt.width) - 1).map(lambda n: (n, n))
    if isinstance(fmt, Ascii):
        return (ASCII_TEXT.map(lambda s: s[: fmt.width]).filter(lambda s: s == s.strip(" "))
                .map(lambda s: (s, s)))
    if isinstance(fmt, Time):
        return DATETIMES.map(lambda d: (d, time_expected(fmt.pattern, d)))
    assert type(fmt) in (Raw, Format), fmt
    return st.binary(min_size=fmt.width, max_size=fmt.width).map(lambda b: (b, b[::-1].hex().upper()))


def random_value(fmt: Format, rng: random.Random) -> tuple[object, object]:
    """The same as `value_strategy`, from a seeded `random.Random` (for whole-table sweeps)."""
    if isinstance(fmt, Bcd):
        limit = bcd_limit(fmt)
        n = rng.choice((0, limit, rng.randint(-limit if fmt.signed else 0, limit)))
        if fmt.signed and rng.random() < 0.5:
            n = -n
        return bcd_value(fmt, n), bcd_value(fmt, n)
    if isinstance(fmt, Digits):
        text = "".join(rng.choice(DIGITS) for _ in range(2 * fmt.width))
        return text, text
    if isinstance(fmt, Binary):
        n = rng.getrandbits(8 * fmt.width)
        return n, n
    if isinstance(fmt, Ascii):
        text = "".join(chr(rng.randint(0x21, 0x7E)) for _ in range(rng.randint(0, fmt.width)))
        return text, text
    if isinstance(fmt, Time):
        when = dt.datetime(2000, 1, 1) + dt.timedelta(seconds=rng.randrange(100 * 366 * 86400))
        when = min(when, dt.datetime(2099, 12, 31, 23, 59, 59))
        return when, time_expected(fmt.pattern, when)
    raw = rng.randbytes(fmt.width)
    return raw, raw[::-1].hex().upper()


def quantity(field: Field, expected: object) -> Quantity:
    flags = tuple(name for i, name in enumerate(field.bits) if name and expected >> i & 1) if field.bits else ()
    return Quantity(expected, field.unit, flags)


def leaf_fields(item: DataItem, edition: int, *, nested: bool = False, tariffs: int = 4,
                count: int | None = None) -> list[Field]:
    """The fields a block's payload carries, in order, as `replies._block` reads them."""
    if item.fields:
        return list(item.fields)
    members = item.members if item.fixed or not nested else item.members[: tariffs + 1]
    if count is not None:
        members = members[:count]
    out: list[Field] = []
    for di in members:
        member = lookup(di, edition)
        assert member is not None, f"{item.di_text()} lists unknown member {di:X}"
        out += leaf_fields(member, edition, nested=True, tariffs=tariffs)
    return out


ITEMS_2007 = sorted(TABLE_2007.values(), key=lambda i: i.di)
ITEMS_1997 = sorted(TABLE_1997.values(), key=lambda i: i.di)
DECODABLE = [i for i in ITEMS_2007 + ITEMS_1997 if i.fields or i.members]


def read_back(item: DataItem, address: str, payload: bytes) -> tuple[dict[str, Quantity], bool]:
    """A meter's answer for `item`, through the wire: read_reply -> parse -> decode (-> ReadSequence)."""
    frames = read_reply(address, item.di, payload, item.edition)
    if len(frames) == 1:
        reply = decode(parse(frames[0]))
        assert (reply.di, reply.edition, reply.item) == (item.di, item.edition, item)
        return reply.values, reply.complete
    assert item.edition == 2007  # no 1997 item needs follow-up frames
    sequence = ReadSequence(address, item.di, item.edition)
    for frame in frames:
        sequence.feed(decode(parse(frame)))
    assert sequence.reply is not None
    return sequence.reply.values, sequence.reply.complete


def encode_fields(fields: list[Field], values: list[tuple[object, object]]) -> tuple[bytes, dict[str, Quantity]]:
    payload = b"".join(f.fmt.encode(v) for f, (v, _) in zip(fields, values, strict=True))
    expected = {f.name: quantity(f, e) for f, (_, e) in zip(fields, values, strict=True)}
    assert len(expected) == len(fields), "a block repeats a field name, so a value would be lost"
    return payload, expected


# --- frames ----------------------------------------------------------------------------------------

@WIDE
@given(address=addresses(), control=controls, data=payloads, preamble=preambles)
def test_build_parse_round_trip(address, control, data, preamble):
    wire = build(address, control, data, preamble=preamble)
    assert len(wire) == preamble + MIN_FRAME + len(data)
    assert parse(wire) == Frame(normalize(address), control, data)


@WIDE
@given(address=addresses(), control=controls, data=payloads, preamble=preambles)
def test_hot_path_matches_the_construct_spec(address, control, data, preamble):
    wire = build(address, control, data, preamble=preamble)
    declared = spec.FRAME.build({"body": {"value": {"address": address, "control": control, "data": data}}})
    assert wire == b"\xfe" * preamble + declared
    frame = parse(wire)
    for struct in (spec.COMPILED_FRAME, spec.FRAME):
        got = struct.parse(wire[preamble:])
        assert (got.body.value.address, got.body.value.control, got.body.value.data) == tuple(frame)


@WIDE
@given(address=st.binary(min_size=6, max_size=6), control=controls, data=payloads)
def test_any_frame_parse_accepts_builds_back_to_the_same_bytes(address, control, data):
    """wire -> Frame -> wire, for every 6 address bytes `parse` accepts (it keeps non-BCD nibbles as hex)."""
    body = b"\x68" + address + bytes((0x68, control, len(data))) + bytes((b + 0x33) & 0xFF for b in data)
    wire = body + bytes((sum(body) & 0xFF, 0x16))
    frame = parse(wire)
    assert frame.address == address[::-1].hex().upper()
    assert frame.to_bytes() == wire


# --- the stream framer -----------------------------------------------------------------------------

@st.composite
def streams(draw, garbage: st.SearchStrategy[bytes]):
    """Valid frames with FE around them and garbage between them, plus the frames they must yield."""
    wire, starts, frames = bytearray(), [], []
    for _ in range(draw(st.integers(0, 6))):
        address, control = draw(addresses()), draw(controls)
        data = draw(st.one_of(st.binary(max_size=24), payloads))
        wire += draw(garbage)
        pre = draw(preambles)
        starts.append(len(wire) + pre)
        wire += build(address, control, data, preamble=pre) + b"\xfe" * draw(preambles)
        frames.append(Frame(normalize(address), control, data))
    wire += draw(garbage)
    return bytes(wire), starts, frames


@st.composite
def garbage_with_68(draw) -> bytes:
    junk = bytearray(draw(st.binary(max_size=24)))
    for _ in range(draw(st.integers(1, 3))):
        junk.insert(draw(st.integers(0, len(junk))), 0x68)
    return bytes(junk)


def chunked(draw, wire: bytes) -> list[bytes]:
    cuts = sorted(set(draw(st.lists(st.integers(0, len(wire)), max_size=24))))
    bounds = [0, *cuts, len(wire)]
    return [wire[a:b] for a, b in itertools.pairwise(bounds)]


def run_framer(framer: Framer, chunks: list[bytes]) -> list:
    events = []
    for chunk in chunks:
        events += framer.feed(chunk)
        assert framer.pending <= framer.max_buffer
        assert framer.pending < MIN_FRAME + MAX_DATA  # never more than one frame's worth held back
    return events + framer.flush()


def valid_frame_starts(wire: bytes) -> list[int]:
    """Reference scan: every offset where a complete, valid frame starts."""
    found = []
    for i in range(len(wire) - MIN_FRAME + 1):
        if wire[i] != 0x68 or wire[i + 7] != 0x68:
            continue
        end = i + 10 + wire[i + 9]
        if end + 2 <= len(wire) and sum(wire[i:end]) & 0xFF == wire[end] and wire[end + 1] == 0x16:
            found.append(i)
    return found


@MEDIUM
@given(data=st.data(), stream=streams(st.binary(max_size=24).map(no_68)))
def test_framer_yields_exactly_the_frames_whatever_the_chunking(data, stream):
    wire, _, expected = stream
    framer = Framer()
    events = run_framer(framer, chunked(data.draw, wire))
    assert [e for e in events if isinstance(e, Frame)] == expected
    assert all(isinstance(e, Frame | Garbage) for e in events), events
    assert framer.pending == 0
    assert framer.stats["frames"] == len(expected)


@MEDIUM
@given(data=st.data(), stream=streams(garbage_with_68()))
def test_framer_finds_the_frames_behind_garbage_with_68(data, stream):
    wire, starts, expected = stream
    # Garbage may by chance complete a valid frame of its own; such a stream is ambiguous.
    assume(valid_frame_starts(wire) == starts)
    framer = Framer()
    events = run_framer(framer, chunked(data.draw, wire))
    assert [e for e in events if isinstance(e, Frame)] == expected
    assert framer.pending == 0


@MEDIUM
@given(data=st.data(), stream=streams(st.binary(max_size=8).map(no_68)),
       accept=st.sampled_from([Accept.REPLIES, Accept.REQUESTS]))
def test_framer_drops_the_other_direction_as_echo(data, stream, accept):
    wire, _, frames = stream
    framer = Framer(accept)
    events = run_framer(framer, chunked(data.draw, wire))
    wanted = [f for f in frames if f.is_reply == (accept is Accept.REPLIES)]
    assert [e for e in events if isinstance(e, Frame)] == wanted
    assert framer.stats["echo"] == len(frames) - len(wanted)
    assert framer.stats["frames"] == len(wanted)


@FAST
@given(data=st.data(), outer_address=addresses(), inner_address=addresses(), inner_control=controls,
       inner_data=st.binary(max_size=16), head=st.binary(max_size=16), tail=st.binary(max_size=16))
def test_framer_delivers_a_split_frame_whose_data_looks_like_a_frame(
        data, outer_address, inner_address, inner_control, inner_data, head, tail):
    """A reply's DATA may contain the wire image of a frame (scrambled data is arbitrary bytes).

    Split across two reads, the real frame must still come out whole, not the image inside it.
    """
    inner = build(inner_address, inner_control, inner_data)
    outer_data = head + bytes((b - 0x33) & 0xFF for b in inner) + tail
    assume(len(outer_data) <= MAX_DATA)
    wire = build(outer_address, 0x91, outer_data)
    image_end = 10 + len(head) + len(inner)  # offset just after the image inside `wire`
    cut = data.draw(st.integers(image_end, len(wire) - 1))
    events = run_framer(Framer(), [wire[:cut], wire[cut:]])
    assert [e for e in events if isinstance(e, Frame)] == [Frame(normalize(outer_address), 0x91, outer_data)]


# --- value formats ---------------------------------------------------------------------------------

BCD_FORMATS = st.builds(Bcd, st.integers(1, 6), st.integers(0, 4), signed=st.booleans())


@WIDE
@given(data=st.data(), fmt=BCD_FORMATS)
def test_bcd_round_trips_exact_values(data, fmt):
    value, expected = data.draw(value_strategy(fmt))
    raw = fmt.encode(value)
    assert len(raw) == fmt.width
    assert fmt.decode(raw) == expected
    assert type(fmt.decode(raw)) is type(expected)


@WIDE
@given(data=st.data(), fmt=BCD_FORMATS)
def test_bcd_round_trips_floats_to_the_last_decimal(data, fmt):
    scale = 10**fmt.decimals
    top = (bcd_limit(fmt) - 1) / scale
    value = data.draw(st.floats(-top if fmt.signed else 0, top, allow_nan=False, allow_infinity=False))
    decoded = fmt.decode(fmt.encode(value))
    assert abs(decoded - value) <= 0.5 / scale + 1e-9 * max(1.0, abs(value))
    assert decoded == round(decoded, fmt.decimals)


@FAST
@given(fmt=BCD_FORMATS, data=st.data())
def test_bcd_rejects_what_does_not_fit(fmt, data):
    limit = bcd_limit(fmt)
    n = data.draw(st.one_of(st.integers(limit + 1, 10 * limit + 10), st.integers(-10 * limit - 10, -1)))
    if n < 0 and fmt.signed:
        n -= limit  # below -limit
    with pytest.raises(EncodeError):
        fmt.encode(n / 10**fmt.decimals)


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_bcd_encode_of_non_finite_raises_encode_error(value):
    """formats.py: "Encoding raises EncodeError for values that do not fit"."""
    with pytest.raises(EncodeError):
        Bcd(4, 2, signed=True).encode(value)


@WIDE
@given(data=st.data(), width=st.integers(1, 8))
def test_digits_binary_ascii_raw_round_trip(data, width):
    for fmt in (Digits(width), Binary(width), Ascii(width), Raw(width)):
        value, expected = data.draw(value_strategy(fmt))
        raw = fmt.encode(value)
        assert len(raw) == width
        assert fmt.decode(raw) == expected


@WIDE
@given(text=st.text(max_size=14), width=st.integers(1, 6))
def test_digits_encode_raises_only_encode_error(text, width):
    """formats.py: encoding raises EncodeError for values that do not fit (e.g. non-ASCII digits)."""
    try:
        raw = Digits(width).encode(text)
    except EncodeError:
        return
    assert len(raw) == width


@WIDE
@given(text=st.text(DIGITS, max_size=12), width=st.integers(1, 6))
def test_digits_pads_short_numbers_with_zeros(text, width):
    assume(len(text) <= 2 * width)
    assert Digits(width).decode(Digits(width).encode(text)) == text.rjust(2 * width, "0")


def test_the_table_uses_exactly_the_time_patterns_under_test():
    used = {f.fmt.pattern for i in ITEMS_2007 + ITEMS_1997 for f in i.fields if isinstance(f.fmt, Time)}
    assert used == set(TIME_PATTERNS)


@WIDE
@given(pattern=st.sampled_from(TIME_PATTERNS), when=DATETIMES)
def test_time_patterns_round_trip(pattern, when):
    fmt = Time(pattern)
    raw = fmt.encode(when)
    assert len(raw) == len(pattern) // 2
    assert fmt.decode(raw) == time_expected(pattern, when)
    if pattern == "YYMMDDWW":  # wire order WW DD MM YY, WW 0 = Sunday
        assert raw[0] == int(str(when.isoweekday() % 7), 16)


ALL_FORMATS = sorted({f.fmt for i in ITEMS_2007 + ITEMS_1997 for f in i.fields}
                     | {Time(p) for p in TIME_PATTERNS}, key=repr)


@WIDE
@given(data=st.data(), fmt=st.one_of(st.sampled_from(ALL_FORMATS), BCD_FORMATS,
                                     st.builds(Bcd, st.integers(1, 6), st.just(0), signed=st.booleans(),
                                               real=st.booleans())))
def test_decode_of_any_bytes_never_raises(data, fmt):
    raw = data.draw(st.binary(min_size=fmt.width, max_size=fmt.width))
    value = fmt.decode(raw)
    if value is INVALID:
        return
    if isinstance(fmt, Bcd):
        assert isinstance(value, float if fmt.real else int)
        if not fmt.signed:  # an unsigned BCD decode is a bijection on valid bytes
            assert fmt.encode(value) == raw
    elif isinstance(fmt, Binary | Digits):
        assert fmt.encode(value) == raw


# --- every data item in the table ------------------------------------------------------------------

@WIDE
@given(data=st.data(), item=st.sampled_from(DECODABLE), address=addresses())
def test_table_items_round_trip_through_a_reply(data, item, address):
    count = None
    if item.members and not item.fixed:  # an open block may be answered with fewer members
        count = data.draw(st.integers(1, len(item.members)))
    fields = leaf_fields(item, item.edition, count=count)
    values = [data.draw(value_strategy(f.fmt)) for f in fields]
    payload, expected = encode_fields(fields, values)
    got, complete = read_back(item, address, payload)
    assert got == expected
    assert complete


def test_every_table_item_round_trips():
    """A deterministic sweep over the whole table (7 000+ items), one random value set each."""
    rng = random.Random(645)
    for item in DECODABLE:
        fields = leaf_fields(item, item.edition)
        payload, expected = encode_fields(fields, [random_value(f.fmt, rng) for f in fields])
        got, complete = read_back(item, "000102030425", payload)
        assert (got, complete) == (expected, True), item.di_text()


# --- requests through the meter-side parser -------------------------------------------------------

auths = st.builds(Auth, level=st.integers(0, 99), password=st.text(DIGITS, min_size=6, max_size=6),
                  operator=st.text(DIGITS, min_size=8, max_size=8))


def request_of(wire: bytes, edition: int | None = None):
    frame = parse(wire)
    assert not frame.is_reply
    return frame, parse_request(frame, edition)


@WIDE
@given(address=addresses(), di=st.integers(0, 2**32 - 1), di97=st.integers(0, 2**16 - 1), preamble=preambles)
def test_read_requests_round_trip(address, di, di97, preamble):
    frame, request = request_of(read_request(address, di, preamble=preamble))
    assert (frame.address, request.function, request.edition, request.di, request.seq, request.body) == (
        normalize(address), 0x11, 2007, di, None, b"")
    frame, request = request_of(read_request(address, di97, 1997, preamble=preamble))
    assert (frame.control, request.function, request.edition, request.di, request.body) == (0x01, 0x01, 1997, di97,
                                                                                            b"")


@FAST
@given(address=addresses(), di=st.integers(0, 2**32 - 1), count=st.integers(1, 99), start=st.none() | DATETIMES)
def test_load_profile_read_round_trips(address, di, count, start):
    _, request = request_of(read_request(address, di, count=count, start=start))
    assert (request.function, request.di) == (0x11, di)
    assert request.body[0] == int(str(count), 16)  # NN in BCD
    if start is None:
        assert len(request.body) == 1
    else:
        assert Time("YYMMDDhhmm").decode(request.body[1:]) == start.replace(second=0, microsecond=0)


@WIDE
@given(address=addresses(), di=st.integers(0, 2**32 - 1), di97=st.integers(0, 2**16 - 1), seq=st.integers(0, 255))
def test_follow_up_requests_round_trip(address, di, di97, seq):
    _, request = request_of(read_follow_up(address, di, seq))
    assert (request.function, request.edition, request.di, request.seq, request.body) == (0x12, 2007, di, seq, b"")
    _, request = request_of(read_follow_up(address, di97, seq, 1997))
    assert (request.function, request.edition, request.di, request.body) == (0x02, 1997, di97, b"")


def auth_of(body: bytes, *, with_operator: bool) -> Auth:
    """PA P0P1P2 [C0..C3] read back by hand, each field low byte first."""
    operator = body[4:8][::-1].hex() if with_operator else "00000000"
    return Auth(int(body[:1].hex()), body[1:4][::-1].hex(), operator)


@WIDE
@given(address=addresses(), di=st.integers(0, 2**32 - 1), di97=st.integers(0, 2**16 - 1), auth=auths,
       value=st.binary(max_size=38))
def test_write_requests_carry_auth_in_place(address, di, di97, auth, value):
    _, request = request_of(write_request(address, di, value, auth))
    assert (request.function, request.edition, request.di) == (0x14, 2007, di)
    assert auth_of(request.body, with_operator=True) == auth
    assert request.body[8:] == value
    assert bytes(spec.AUTH.build({"level": auth.level, "password": int(auth.password),
                                  "operator": bytes.fromhex(auth.operator)[::-1]})) == request.body[:8]

    _, request = request_of(write_request(address, di97, value, auth, 1997))
    assert (request.function, request.edition, request.di) == (0x04, 1997, di97)
    assert auth_of(request.body, with_operator=False) == Auth(auth.level, auth.password)
    assert request.body[4:] == value


@WIDE
@given(address=addresses(), action=st.sampled_from(Action), deadline=DATETIMES, auth=auths,
       n2=st.integers(0, 255), preamble=preambles)
def test_control_payload_round_trips(address, action, deadline, auth, n2, preamble):
    deadline = deadline.replace(microsecond=0)
    wire = control_request(address, action, deadline, builder=PlaintextBuilder(auth, n2), preamble=preamble)
    frame, request = request_of(wire)
    assert (frame.address, frame.control, request.di, len(request.body)) == (normalize(address), 0x1C, None, 16)
    payload = parse_control_payload(request.body)
    assert payload == (auth, action, n2, deadline)
    assert payload.action is action
    # the 16 bytes in the standard's order: PA P0P1P2 C0..C3 N1 N2 ss mm hh DD MM YY
    assert auth_of(request.body, with_operator=True) == auth
    assert request.body[8:10] == bytes((action, n2))
    assert request.body[10:] == Time("YYMMDDhhmmss").encode(deadline)
    assert control_request(address, action, deadline, auth=auth) == build(
        address, 0x1C, PlaintextBuilder(auth).payload(address, action, deadline))


# --- multi-frame reads -----------------------------------------------------------------------------

def unknown_di(edition: int) -> st.SearchStrategy[int]:
    bits = 16 if edition == 1997 else 32
    return st.integers(0, 2**bits - 1).filter(lambda di: lookup(di, edition) is None)


def run_sequence(address: str, di: int, payload: bytes, edition: int) -> ReadSequence:
    sequence = ReadSequence(address, di, edition)
    _, request = request_of(sequence.request)
    assert (request.function, request.di) == ((0x01 if edition == 1997 else 0x11), di)
    frames = read_reply(address, di, payload, edition)
    for k, wire in enumerate(frames, start=1):
        assert not sequence.done
        reply = decode(parse(wire))
        assert reply.more == (k < len(frames))
        following = sequence.feed(reply)
        if k == len(frames):
            assert following is None
            break
        assert following is not None
        _, request = request_of(following)
        if edition == 1997:
            assert (request.function, request.di) == (0x02, di)
        else:
            assert (request.function, request.di, request.seq) == (0x12, di, k)
    assert sequence.done
    assert sequence.frames == len(frames)
    return sequence


@MEDIUM
@given(data=st.data(), address=addresses(), payload=sized_binary(1500))
def test_read_sequence_joins_follow_up_frames_2007(data, address, payload):
    di = data.draw(unknown_di(2007))
    reply = run_sequence(address, di, payload, 2007).reply
    assert reply is not None
    assert reply.payload == payload
    assert not reply.more
    assert reply.values == {f"{di:08X}": Quantity(payload.hex().upper(), "", ("raw",))}


@MEDIUM
@given(data=st.data(), address=addresses(), payload=sized_binary(1500))
def test_read_sequence_joins_follow_up_frames_1997(data, address, payload):
    """1997 follow-up replies (82/A2) are DI + data; `answers.read_reply` builds them without a SEQ byte."""
    di = data.draw(unknown_di(1997))
    reply = run_sequence(address, di, payload, 1997).reply
    assert reply is not None
    assert reply.payload == payload
    assert reply.values == {f"{di:04X}": Quantity(payload.hex().upper(), "", ("raw",))}


def test_1997_follow_up_reply_keeps_its_last_data_byte():
    """The minimal case of the property above: a 1997 follow-up (82) is DI + data, no SEQ."""
    _, follow_up = read_reply("1", 0x1234, bytes(range(199)), 1997)
    assert parse(follow_up).data == b"\x34\x12\xc6"
    reply = decode(parse(follow_up))
    assert (reply.edition, reply.di, reply.seq, reply.payload) == (1997, 0x1234, None, b"\xc6")
