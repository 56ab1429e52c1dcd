"""What a simulated meter answers for each DI, driven by the DI table.

The table says which quantities a DI carries and how they are encoded; this
module only knows how to compute each quantity by name for a meter at a
moment. Freezes, settlement periods and event records select the moment
(or the record) from the DI itself, then evaluate the same names, so a
daily freeze holds exactly what the live registers held at that midnight.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import TYPE_CHECKING, Any

from protocols.dlt645 import DataItem, lookup
from protocols.dlt645.identifiers import ENERGY_TYPES
from simulators.events import NoData
from simulators.profile import DAY, HOUR, phase_wave

if TYPE_CHECKING:
    from simulators.meter import Meter

EPOCH = dt.datetime(1970, 1, 1)
KINDS = {name: tt for tt, (name, _, _) in ENERGY_TYPES.items()}
FREEZE_DEPTH = {0x00: 60, 0x04: 254, 0x06: 62}  # timed, hourly, daily: the kinds a meter keeps


def to_datetime(t_local: float) -> dt.datetime:
    return EPOCH + dt.timedelta(seconds=round(t_local))


def to_local(when: dt.datetime) -> float:
    return (when - EPOCH).total_seconds()


class Moment:
    """What a name is evaluated against: real local time (for energy), the meter's clock reading,
    and the n of a settlement period or event record the DI asked for."""

    __slots__ = ("clock", "energy", "index", "real", "settle")

    def __init__(self, real: float, clock: float, settle: int = 0, index: int = 0) -> None:
        self.real = real
        self.clock = clock
        self.settle = settle
        self.index = index
        self.energy: list[float] | None = None  # registers at `real`, computed once per request


def _strip(name: str, marker: str) -> tuple[str, int]:
    """'forward_active_energy_t2_last3' -> ('forward_active_energy_t2', 3) for marker '_last'."""
    head, sep, tail = name.rpartition(marker)
    if sep and tail.isdigit():
        return head, int(tail)
    return name, 0


class Registers:
    """Payloads for one meter. `payload(di, now)` is None when the meter has no such data."""

    def __init__(self, meter: Meter) -> None:
        self.meter = meter

    # --- entry point ----------------------------------------------------------------------------
    def payload(self, di: int, now: float) -> bytes | None:
        m = self.meter
        item = lookup(di, m.edition)
        if item is None or (not item.fields and not item.members):
            return None
        if m.written and item.name in m.written:
            return m.written[item.name]
        moment = self._moment(item, now)
        if moment is None:
            return None
        try:
            return self._encode(item, moment, top=True)
        except NoData:
            return None

    def _moment(self, item: DataItem, now: float) -> Moment | None:
        m = self.meter
        real = m.real_local(now)
        clock = m.clock_local(now)
        di = item.di if item.edition == 2007 else (item.equivalent or 0)
        if di >> 24 == 0x05:  # freezes: the n-th most recent, by the meter's own clock
            kind, n = di >> 16 & 0xFF, di & 0xFF
            if kind not in FREEZE_DEPTH or not 1 <= n <= FREEZE_DEPTH[kind]:
                return None
            step = HOUR if kind == 0x04 else DAY
            frozen = (clock // step - (n - 1)) * step
            real_then = frozen - (clock - real)
            if real_then < m.consumption.epoch_day * DAY:
                return None
            return Moment(real_then, frozen)
        if di >> 24 in (0x00, 0x01) and di & 0xFF:  # settlement periods: month starts, n back
            n = di & 0xFF
            start = to_datetime(clock).replace(day=1, hour=0, minute=0, second=0)
            for _ in range(n - 1):
                start = (start - dt.timedelta(days=1)).replace(day=1)
            frozen = to_local(start)
            return Moment(frozen - (clock - real), frozen, n)
        if di >> 24 in (0x03, 0x1D, 0x1E):  # event records: DI0 is the n-th most recent
            return Moment(real, clock, index=di & 0xFF)
        return Moment(real, clock)

    def _encode(self, item: DataItem, moment: Moment, *, top: bool) -> bytes:
        if item.fields:
            return b"".join(f.fmt.encode(self.value(f.name, moment)) for f in item.fields)
        members = item.members
        if not item.fixed:
            members = members[: self.meter.tariffs + 1]
        parts = []
        for di in members:
            member = lookup(di, item.edition)
            if member is None:
                raise NoData
            parts.append(self._encode(member, moment, top=False))
        return b"".join(parts)

    # --- quantities by name ----------------------------------------------------------------------
    def value(self, name: str, moment: Moment) -> Any:
        name, _ = _strip(name, "_last")
        m = self.meter
        if m.events.owns(name):
            return m.events.value(name, moment.index)
        if "_freeze_time" in name:
            return to_datetime(moment.clock)
        if "_energy" in name:
            return self._energy(name, moment)
        if "_max_demand" in name:
            return self._demand(name, moment)
        handler = _SIMPLE.get(name)
        if handler is not None:
            return handler(m, moment)
        for prefix in ("voltage", "current", "active_power", "reactive_power", "apparent_power",
                       "power_factor", "phase_angle", "voltage_thd", "current_thd", "voltage_harmonic",
                       "current_harmonic"):
            if name.startswith(prefix):
                return m.electrical(name, moment.real)
        raise NoData

    def _energy(self, name: str, moment: Moment) -> float:
        m = self.meter
        head, tariff = _strip(name, "_t")
        phase = ""
        if head[-2:] in ("_a", "_b", "_c"):
            head, phase = head[:-2], head[-1]
        kind = head.removesuffix("_energy")
        registers = moment.energy
        if registers is None:
            registers = moment.energy = m.registers_at(moment.real)
        if tariff >= len(registers):  # a tariff the meter does not have: the meter says "no data", not silence
            raise NoData
        active = registers[tariff]
        pf = m.pf
        share = 1.0 if not phase else (1.0 if m.phases == 1 and phase == "a" else
                                       (1 / 3 if m.phases == 3 else 0.0))
        if kind in ("forward_active", "combined_active"):
            value = active
        elif kind in ("combined_reactive_1", "q1_reactive"):
            value = active * math.tan(math.acos(pf))
        elif kind == "forward_apparent":
            value = active / pf
        elif kind in KINDS:
            value = 0.0  # no export and no capacitive load on a residential meter
        else:
            raise NoData
        return round(value * share, 2)

    def _demand(self, name: str, moment: Moment) -> Any:
        m = self.meter
        head, tariff = _strip(name.removesuffix("_time"), "_t")
        if not head.startswith("forward_active") or tariff:
            return 0.0 if not name.endswith("_time") else to_datetime(moment.clock)
        clock = to_datetime(moment.clock)
        if moment.settle:  # the whole month before the settlement point
            end = moment.real
            first = to_local((clock - dt.timedelta(days=1)).replace(day=1, hour=0, minute=0, second=0))
        else:
            end = moment.real
            first = to_local(clock.replace(day=1, hour=0, minute=0, second=0))
        offset = moment.clock - moment.real
        kw, when = m.consumption.max_hourly_power(int((first - offset) // DAY), int(end // DAY), end)
        if name.endswith("_time"):
            return to_datetime(when + offset)
        return round(kw, 4)


def _freq(m: Meter, at: Moment) -> float:
    return round(50.0 + 0.04 * phase_wave(m.seed, at.real, 613.0, 3), 2)


_SIMPLE: dict[str, Any] = {
    "date": lambda m, at: to_datetime(at.clock),
    "time": lambda m, at: to_datetime(at.clock).time(),
    "address": lambda m, at: m.address,
    "meter_number": lambda m, at: m.meter_number,
    "asset_number": lambda m, at: f"SIM{m.address}",
    "rated_voltage": lambda m, at: "220V",
    "rated_current": lambda m, at: "5A",
    "max_current": lambda m, at: "60A",
    "active_accuracy": lambda m, at: "1.0",
    "reactive_accuracy": lambda m, at: "2.0",
    "active_constant": lambda m, at: 1200,
    "reactive_constant": lambda m, at: 1200,
    "model": lambda m, at: "DDZY-SIM",
    "production_date": lambda m, at: "2024-01-15",
    "protocol_version": lambda m, at: f"DL/T645-{m.edition}",
    "demand_period": lambda m, at: 15,
    "demand_slide": lambda m, at: 1,
    "year_zone_count": lambda m, at: 1,
    "day_table_count": lambda m, at: 1,
    "day_slot_count": lambda m, at: 8,
    "tariff_count": lambda m, at: m.tariffs,
    "holiday_count": lambda m, at: 0,
    "frequency": _freq,
    "neutral_current": lambda m, at: 0.0,
    "average_active_power": lambda m, at: round(m.load_kw(at.real), 4),
    "active_demand": lambda m, at: round(m.load_kw(at.real), 4),
    "reactive_demand": lambda m, at: round(m.load_kw(at.real) * math.tan(math.acos(m.pf)), 4),
    "apparent_demand": lambda m, at: round(m.load_kw(at.real) / m.pf, 4),
    "temperature": lambda m, at: round(25.0 + 5 * phase_wave(m.seed, at.real, DAY, 4), 1),
    "clock_battery_voltage": lambda m, at: 3.6,
    "reading_battery_voltage": lambda m, at: 6.0,
    "battery_time": lambda m, at: 0,
    "trip_delay": lambda m, at: m.relay.trip_delay_s // 60,
    "load_record_start": lambda m, at: dt.datetime(2000, 1, 1),
    "settlement_day_1": lambda m, at: dt.datetime(2000, 1, 1, 0),
    "remaining_money": lambda m, at: max(m.balance(at.real), 0.0),
    "overdraft_money": lambda m, at: max(-m.balance(at.real), 0.0),
    "remaining_energy": lambda m, at: max(m.balance(at.real) / m.price, 0.0),
    "overdraft_energy": lambda m, at: max(-m.balance(at.real) / m.price, 0.0),
    "alarm_amount_1": lambda m, at: 20.0,
    "alarm_amount_2": lambda m, at: 10.0,
    "overdraft_limit": lambda m, at: 0.0,
    "hoarding_limit": lambda m, at: 9999.0,
    "close_allowed_amount": lambda m, at: 0.0,
    "active_combination": lambda m, at: 0x05,
    "reactive_combination_1": lambda m, at: 0x41,
    "reactive_combination_2": lambda m, at: 0x14,
    "status_byte": lambda m, at: 0,
}
def _status(n: int) -> Any:
    return lambda m, at: m.status_word(n, at.real)


for _n in range(1, 8):
    _SIMPLE[f"status_word_{_n}"] = _status(_n)
for _n, _port in enumerate(("ir_modulated", "ir_contact", "port_1", "port_2", "port_3"), start=1):
    _SIMPLE[f"baud_{_port}"] = lambda m, at: {1200: 0x04, 2400: 0x08, 4800: 0x10, 9600: 0x20}.get(m.baud, 0x08)
