"""`Reading` is a value: equal and hashed by its fields, no attributes beyond them."""

from __future__ import annotations

import dataclasses

import pytest

from gateway.model import Quality, Reading


def reading(**changes: object) -> Reading:
    base = Reading("000100000001", "voltage_a", 220.1, "V", 1_700_000_000.0, 1_700_000_001.0, "s1", "line-1", "p")
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_readings_are_equal_and_hashed_by_value() -> None:
    assert reading() == reading() and hash(reading()) == hash(reading())
    assert reading() != reading(value=220.2) and reading() != reading(quality=Quality.INVALID)
    assert len({reading(), reading(), reading(time=1.0)}) == 2  # de-duplication by value works


def test_a_reading_has_its_fields_and_nothing_else() -> None:
    r = reading()
    assert [f.name for f in dataclasses.fields(r)] == ["meter", "quantity", "value", "unit", "time", "collected",
                                                       "station", "link", "plan", "frozen", "quality"]
    assert (r.frozen, r.quality) == (False, Quality.GOOD)
    with pytest.raises(AttributeError):
        r.extra = 1  # type: ignore[attr-defined]  # slotted: a typo cannot add a field
