"""Line protocol and journal rows after the per-series caches and type-keyed dispatch: same output."""

from __future__ import annotations

import enum
import math

from gateway import journal_store as store
from gateway.model import Quality, Reading
from gateway.sinks.lineproto import field_value, reading_lines


class Level(enum.IntEnum):
    HIGH = 3


class Label(str):
    pass


def reading(quantity: str, value: object, *, meter: str = "000000000001", link: str = "line 1",
            station: str = "st,a=1", t: float = 1_700_000_000.9, **kw: object) -> Reading:
    return Reading(meter, quantity, value, "", t, t, station, link, "p", **kw)  # type: ignore[arg-type]


def test_a_series_seen_in_an_earlier_batch_is_written_the_same_way():
    first = reading_lines([reading("voltage_a", 220.5)])
    again = reading_lines([reading("voltage_a", 220.5)])
    other = reading_lines([reading("voltage_a", 220.5, link="line,2")])
    assert first == again == [r"voltage,link=line\ 1,meter=000000000001,station=st\,a\=1 voltage_a=220.5 1700000000"]
    assert other == [r"voltage,link=line\,2,meter=000000000001,station=st\,a\=1 voltage_a=220.5 1700000000"]


def test_subclasses_of_the_value_types_keep_their_base_types_form():
    assert field_value(Level.HIGH) == "3i"
    assert field_value(Label('a"b')) == '"a\\"b"'
    assert field_value(True) == "true" and field_value(1) == "1i" and field_value(1e16) == "1.0e+16"
    assert field_value(math.inf) is None and field_value(2**63) is None


def test_a_doubtful_reading_and_a_later_value_of_the_same_field_in_one_point():
    lines = reading_lines([reading("voltage_a", 1.0), reading("voltage_b", 2.0),
                           reading("voltage_a", 3.0, t=1_700_000_000.1),
                           reading("voltage_c", None, quality=Quality.INVALID), reading("voltage_c", math.nan)])
    assert lines == [r'voltage,link=line\ 1,meter=000000000001,station=st\,a\=1 voltage_a=3.0,voltage_b=2.0,'
                     r'voltage_c_quality="invalid" 1700000000']


def test_rows_round_trip_every_value_type_including_subclasses():
    for value, back in ((Level.HIGH, 3), (Label("x"), "x"), (True, True), (2**64, 2**64), (None, None), (0.25, 0.25)):
        row = store.to_row(reading("status_word_1", value))
        again = store.from_row(row)
        assert again.value == back and type(again.value) is type(back)
    row = store.to_row(reading("voltage_a", math.nan, quality=Quality.LENGTH_MISMATCH, frozen=True))
    again = store.from_row((*row[:2], None, *row[3:]))  # SQLite gives NaN back as NULL
    assert math.isnan(again.value) and again.quality is Quality.LENGTH_MISMATCH and again.frozen  # type: ignore[arg-type]
    assert store.from_row((*row[:11], "from-a-newer-meterd")).quality is Quality.INVALID
