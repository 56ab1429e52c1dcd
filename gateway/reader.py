"""How a meter is reached: the DL/T 645 direct reader.

A reader turns "these items of this meter" into bus transactions and the
replies into `Reading`s. It is the only part that knows the protocol, so
the bus, plans, journal and statistics work the same for a meter behind a
concentrator or a Modbus meter (later readers with the same `read`).
Frozen data is stamped with its freeze time, read from the meter, not with
the time it was collected.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable, Sequence
from typing import Protocol
from zoneinfo import ZoneInfo

from gateway.archive import MeterConfig
from gateway.bus import BadFrame, Bus, BusError, Priority, Timing
from gateway.model import Outcome, Quality, Reading, Reason, Value
from protocols.dlt645 import DataItem, DecodeError, Error2007, ReadSequence, Reply, decode, error_names, find


class Reader(Protocol):
    async def read(self, bus: Bus, meter: MeterConfig, items: Sequence[str], *, plan: str,
                   priority: Priority = Priority.ROUTINE) -> Outcome: ...


def freeze_time_di(item: DataItem) -> int | None:
    """The DI of the freeze time that stamps a frozen item (2007 class 05), None for live data."""
    if item.edition != 2007 or item.di >> 24 != 0x05 or item.di >> 8 & 0xFF == 0x00:
        return None
    return item.di & 0xFFFF00FF


class Dlt645Reader:
    def __init__(self, station: str, tz: ZoneInfo, timing_for: Callable[[MeterConfig], Timing]) -> None:
        self.station = station
        self.tz = tz
        self.timing_for = timing_for

    async def read(self, bus: Bus, meter: MeterConfig, items: Sequence[str], *, plan: str,
                   priority: Priority = Priority.ROUTINE) -> Outcome:
        started = time.time()
        outcome = Outcome(meter.address, ok=True)
        stamps: dict[int, float] = {}
        for name in items:
            item = find(name, meter.edition)
            try:
                stamp: float | None = None
                time_di = freeze_time_di(item)
                if time_di is not None:
                    stamp = stamps.get(time_di)
                    if stamp is None:
                        stamp = stamps[time_di] = await self._freeze_time(bus, meter, time_di, priority)
                reply = await self._exchange(bus, meter, item.di, priority)
            except BusError as exc:  # the meter or the line failed: the rest would fail the same way
                outcome.ok, outcome.reason, outcome.detail = False, Reason(exc.reason), str(exc)
                break
            if reply.error is not None:
                no_data = reply.edition == 2007 and reply.error == Error2007.NO_DATA
                outcome.ok = False
                outcome.reason = Reason.NO_DATA if no_data else Reason.ABNORMAL_REPLY
                outcome.detail = f"{name}: {','.join(error_names(reply.error))}"
                continue
            outcome.readings += self._readings(meter, meter.link, plan, reply, stamp)  # configured link: bounded tag
        outcome.duration = time.time() - started
        return outcome

    async def _exchange(self, bus: Bus, meter: MeterConfig, di: int, priority: Priority) -> Reply:
        sequence = ReadSequence(meter.address, di, meter.edition, tariffs=meter.tariffs)
        request: bytes | None = sequence.request
        timing = self.timing_for(meter)
        while request is not None:
            frame = await bus.transact(request, meter.address, priority=priority, timing=timing)
            if frame is None:
                raise BadFrame("no frame")
            try:
                request = sequence.feed(decode(frame, meter.edition, tariffs=meter.tariffs))
            except DecodeError as exc:
                raise BadFrame(f"undecodable reply from {meter.address}: {exc}") from exc
        assert sequence.reply is not None
        return sequence.reply

    async def _freeze_time(self, bus: Bus, meter: MeterConfig, di: int, priority: Priority) -> float:
        reply = await self._exchange(bus, meter, di, priority)
        values = list(reply.values.values())
        if reply.error is not None or not values or not isinstance(values[0].value, dt.datetime):
            raise BadFrame(f"{meter.address} gave no usable freeze time for {di:08X}")
        return values[0].value.replace(tzinfo=self.tz).timestamp()

    def _readings(self, meter: MeterConfig, link: str, plan: str, reply: Reply, stamp: float | None) -> list[Reading]:
        collected = time.time()
        out = []
        quality = Quality.GOOD if reply.complete else Quality.LENGTH_MISMATCH
        for name, q in reply.values.items():
            if "_freeze_time_" in name:
                if stamp is None and isinstance(q.value, dt.datetime):
                    stamp = q.value.replace(tzinfo=self.tz).timestamp()
                continue
            value: Value = q.value.isoformat() if isinstance(q.value, dt.datetime | dt.date | dt.time) else q.value
            out.append(Reading(meter.address, name, value, q.unit, stamp if stamp is not None else collected,
                               collected, self.station, link, plan, stamp is not None,
                               Quality.INVALID if "invalid" in q.flags else quality))
        return out
