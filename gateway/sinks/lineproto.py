"""Readings and round statistics as InfluxDB line protocol: meterd's time-series schema.

Schema (see also the sinks section of README):

- measurement: the quantity's family, from its name (`FAMILIES`, first match wins):
  prepaid, event, clock, demand, energy, power_factor, power, harmonics, voltage,
  current, frequency, phase_angle, status, else `other`;
- tags (sorted): `frozen=true` for frozen data only, `link`, `meter`, `station`; empty ones
  are left out. Nothing per read (plan, quality, collection time) is a tag;
- fields: one per quantity, named after it. float -> `1.5` (always with a decimal point),
  int -> `5i`, bool -> `true`/`false`, str (and date/time values) -> `"..."` (ISO text for
  dates). A reading whose quality is not good writes no value field but a string field
  `<quantity>_quality` with the quality (`"invalid"`, `"length_mismatch"`): a doubtful value
  never lands in the value series and never risks a field-type conflict. None values,
  non-finite floats and ints outside int64 are left out;
- timestamp: `reading.time` floored to whole seconds (write with precision=s). Readings with
  the same measurement, tags and second become one line (a later field of the same name wins,
  as InfluxDB itself does for the same point).

Round statistics go to measurement `collection`, tags `plan`, `reread`, `station`, fields
`expected`, `collected`, `skipped`, `failed_<reason>` (int, every known reason, 0 when none),
`success_ratio`, `duration` (float, s; only for finished rounds), `round_id` (string);
timestamp = the round's start.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

from gateway.model import Quality, Reading, Reason, RoundStats

_EVENTS = ("power_down", "programming", "meter_clear", "event_clear", "time_set", "cover_open",
           "terminal_cover_open", "trip", "close", "demand_clear")

# (measurement, pattern on the quantity name); first match wins, no match -> "other".
FAMILIES: tuple[tuple[str, re.Pattern[str]], ...] = tuple((family, re.compile(pattern)) for family, pattern in (
    ("prepaid", r"^(remaining|overdraft)_|^(alarm_amount_\d+|hoarding_limit|close_allowed_amount|trip_delay)$"),
    ("event", rf"^({'|'.join(_EVENTS)})_"),
    ("clock", r"^(date|time)$|_freeze_time(_|$)"),
    ("demand", r"_demand(_|$)"),
    ("energy", r"_energy(_|$)"),
    ("power_factor", r"^power_factor"),
    ("power", r"(^|_)(active|reactive|apparent)_power(_|$)"),
    ("harmonics", r"_thd(_|$)|_harmonic_"),
    ("voltage", r"^voltage(_[abc])?$|_battery_voltage$"),
    ("current", r"^(neutral_)?current(_[abc])?$"),
    ("frequency", r"^frequency$"),
    ("phase_angle", r"^phase_angle"),
    ("status", r"^status_"),
))
OTHER = "other"
COLLECTION = "collection"
QUALITY_SUFFIX = "_quality"
_INT64 = (-(2**63), 2**63 - 1)

_KEY_ESCAPES = str.maketrans({",": r"\,", "=": r"\=", " ": r"\ ", "\n": " ", "\r": " "})
_MEASUREMENT_ESCAPES = str.maketrans({",": r"\,", " ": r"\ ", "\n": " ", "\r": " "})
_STRING_ESCAPES = str.maketrans({"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r"})


@functools.lru_cache(maxsize=8192)
def measurement_of(quantity: str) -> str:
    """The measurement (quantity family) a quantity is written to."""
    for family, pattern in FAMILIES:
        if pattern.search(quantity):
            return family
    return OTHER


def escape_key(text: str) -> str:
    """A tag key, tag value or field key: commas, equals signs and spaces escaped."""
    return text.translate(_KEY_ESCAPES)


def escape_measurement(text: str) -> str:
    return text.translate(_MEASUREMENT_ESCAPES)


def quote_string(text: str) -> str:
    """A string field value: quoted, with backslashes and double quotes escaped.

    Line protocol has no newline inside a value: CR/LF are written as the two characters
    backslash + r/n."""
    return '"' + text.translate(_STRING_ESCAPES) + '"'


def _float_text(value: float) -> str | None:
    if not math.isfinite(value):
        return None
    text = repr(value)
    return text if "." in text else text.replace("e", ".0e")


def _int_text(value: int) -> str | None:
    return f"{value}i" if _INT64[0] <= value <= _INT64[1] else None


# exact value type -> its line-protocol text (None: not writable); one dict lookup instead of an isinstance chain
_FIELD_TEXT: dict[type, Callable[[Any], str | None]] = {
    float: _float_text, int: _int_text, bool: lambda v: "true" if v else "false", str: quote_string,
    type(None): lambda v: None,
}


def field_value(value: object) -> str | None:
    """One field value in line protocol, or None when it cannot be written."""
    text = _FIELD_TEXT.get(type(value))
    if text is not None:
        return text(value)
    if isinstance(value, bool):  # subclasses (an IntEnum, a str subclass) keep their base type's form
        return "true" if value else "false"
    if isinstance(value, int):
        return _int_text(value)
    if isinstance(value, float):
        return _float_text(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return quote_string(value.isoformat())
    return quote_string(str(value))


def tag_set(tags: Iterable[tuple[str, str]]) -> str:
    """`,k=v,...` sorted by key, empty values left out."""
    return "".join(f",{escape_key(k)}={escape_key(v)}" for k, v in sorted(tags) if v)


@functools.lru_cache(maxsize=8192)
def _keys(quantity: str) -> tuple[str, str, str]:
    """A quantity's escaped measurement, its field key and the key of its quality field."""
    return escape_measurement(measurement_of(quantity)), escape_key(quantity), escape_key(quantity + QUALITY_SUFFIX)


@functools.lru_cache(maxsize=65536)
def _head(measurement: str, meter: str, station: str, link: str, frozen: bool) -> str:
    """`measurement,tags` of one series, escaped once per series rather than once per reading."""
    return measurement + tag_set([("meter", meter), ("station", station), ("link", link),
                                  ("frozen", "true" if frozen else "")])


def _lines(points: dict[tuple[str, int], dict[str, str]]) -> list[str]:
    """Each point's fields are held as `key=value` texts."""
    return [f"{head} {','.join(fields.values())} {ts}" for (head, ts), fields in points.items()]


def reading_lines(readings: Iterable[Reading]) -> list[str]:
    """Readings -> lines, one per (measurement, tags, second), in first-seen order."""
    points: dict[tuple[str, int], dict[str, str]] = {}
    good, texts, floor = Quality.GOOD, _FIELD_TEXT, math.floor
    for reading in readings:
        measurement, key, quality_key = _keys(reading.quantity)
        if reading.quality is good:
            value = reading.value
            text = texts.get(type(value))
            value_text = text(value) if text is not None else field_value(value)
            if value_text is None:
                continue
        else:
            key, value_text = quality_key, quote_string(str(reading.quality))
        point = (_head(measurement, reading.meter, reading.station, reading.link, reading.frozen),
                 floor(reading.time))
        fields = points.get(point)
        if fields is None:
            points[point] = {key: f"{key}={value_text}"}
        else:
            fields[key] = f"{key}={value_text}"  # a later field of the same name wins, in its first place
    return _lines(points)


# a journal row's vtype (gateway/journal_store.py) -> its raw column as a field value's text, None: not
# writable; the same texts `from_row` + `reading_lines` give (NaN comes back from SQLite as NULL)
_ROW_TEXT: dict[str, Callable[[Any], str | None]] = {
    "float": lambda raw: None if raw is None else _float_text(float(raw)),
    "int": lambda raw: _int_text(int(raw)), "bool": lambda raw: "true" if raw else "false",
    "str": lambda raw: quote_string(str(raw)),
}
_QUALITY_TEXT = {q.value: quote_string(q.value) for q in Quality if q is not Quality.GOOD}


def row_lines(rows: Iterable[tuple[Any, ...]]) -> list[str]:
    """Journal rows (id, then journal_store.COLUMNS) -> the lines `reading_lines` gives for their readings.

    The sink's read path: encoding rows where the journal reads them builds no `Reading` (that cost more
    than the encoding). Byte-identical to `reading_lines(from_row(...))` (golden tests)."""
    points: dict[tuple[str, int], dict[str, str]] = {}
    texts, qualities, invalid, floor = _ROW_TEXT, _QUALITY_TEXT, _QUALITY_TEXT["invalid"], math.floor
    for _, meter, quantity, raw, vtype, _, time, _, station, link, _, frozen, quality in rows:
        measurement, key, quality_key = _keys(quantity)
        if quality == "good":
            text = texts.get(vtype)
            value_text = None if text is None else text(raw)
            if value_text is None:
                continue
        else:
            key, value_text = quality_key, qualities.get(quality, invalid)
        point = (_head(measurement, meter, station, link, bool(frozen)), floor(time))
        fields = points.get(point)
        if fields is None:
            points[point] = {key: f"{key}={value_text}"}
        else:
            fields[key] = f"{key}={value_text}"
    return _lines(points)


def round_fields(stats: RoundStats) -> dict[str, int | float | str]:
    """The `collection` fields of one round (also the MQTT payload's numbers)."""
    fields: dict[str, int | float | str] = {
        "expected": stats.expected,
        "collected": stats.collected,
        "skipped": stats.skipped,
        "success_ratio": float(stats.success_ratio),
    }
    for reason in (*(str(r) for r in Reason), *sorted(stats.failed)):
        fields[f"failed_{reason}"] = int(stats.failed.get(reason, 0))
    if stats.finished is not None:
        fields["duration"] = round(float(stats.finished - stats.started), 3)
    fields["round_id"] = stats.round_id
    return fields


def round_lines(rounds: Iterable[RoundStats]) -> list[str]:
    """Round statistics -> `collection` lines (one per round; same key merges)."""
    points: dict[tuple[str, int], dict[str, str]] = {}
    for stats in rounds:
        head = COLLECTION + tag_set([("station", stats.station), ("plan", stats.plan),
                                     ("reread", str(stats.reread))])
        fields = points.setdefault((head, math.floor(stats.started)), {})
        for key, value in round_fields(stats).items():
            text = field_value(value)
            if text is not None:
                fields[escape_key(key)] = f"{escape_key(key)}={text}"
    return _lines(points)
