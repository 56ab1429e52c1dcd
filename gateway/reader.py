"""How a meter is reached: the DL/T 645 direct reader.

A reader turns "these items of this meter" into bus transactions and the
replies into `Reading`s. It is the only part that knows the protocol, so
the bus, plans, journal and statistics work the same for a meter behind a
concentrator or a Modbus meter (later readers with the same `read`).
Frozen data is stamped with its freeze time, read from the meter, not with
the time it was collected. Single items of one block are read with one block
read when that saves bus time (`protocols.dlt645.blocks`); a meter that
answers a block with an error, or with fewer members than asked for, gets
single reads instead (remembered per meter and block), so the readings are
the same as single reads would give.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Protocol
from zoneinfo import ZoneInfo

from gateway.archive import MeterConfig
from gateway.bus import BadFrame, Bus, BusError, Priority, Timing
from gateway.model import Outcome, Quality, Reading, Reason, Value
from protocols.dlt645 import (
    DataItem,
    DecodeError,
    Error2007,
    Frame,
    ReadSequence,
    Reply,
    decode,
    error_names,
    find,
    read_request,
)
from protocols.dlt645.blocks import Read, fields_of, missing, plan_reads

PLAN_CACHE = 4096  # (items, edition, tariffs, refused blocks) -> reads; the same few plans for every meter


class Reader(Protocol):
    async def read(self, bus: Bus, meter: MeterConfig, items: Sequence[str], *, plan: str,
                   priority: Priority = Priority.ROUTINE) -> Outcome: ...


def freeze_time_di(item: DataItem) -> int | None:
    """The DI of the freeze time that stamps a frozen item (2007 class 05), None for live data."""
    if item.edition != 2007 or item.di >> 24 != 0x05 or item.di >> 8 & 0xFF == 0x00:
        return None
    return item.di & 0xFFFF00FF


class Dlt645Reader:
    def __init__(self, station: str, tz: ZoneInfo, timing_for: Callable[[MeterConfig], Timing], *,
                 merge_blocks: bool = True) -> None:
        self.station = station
        self.tz = tz
        self.timing_for = timing_for
        self.merge_blocks = merge_blocks
        self.no_blocks: dict[str, set[int]] = {}  # meter -> block DIs it answered with an error
        self._plans: dict[tuple[tuple[str, ...], int, int, frozenset[int]], list[Read]] = {}
        self.stats: Counter[str] = Counter()  # block_reads (merged), block_fallbacks

    async def read(self, bus: Bus, meter: MeterConfig, items: Sequence[str], *, plan: str,
                   priority: Priority = Priority.ROUTINE) -> Outcome:
        started = time.time()
        outcome = Outcome(meter.address, ok=True)
        stamps: dict[int, float] = {}
        reads = deque(self.plan(meter, items))
        while reads:
            step = reads.popleft()
            item = step.item
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
            if step.merged:
                left = step.serves if reply.error is not None or not reply.complete else \
                    missing(step, reply.values, meter.edition)
                if left:  # not (all) answered as a block: those items alone
                    self.stats["block_fallbacks"] += 1
                    if reply.error is not None or not reply.complete:  # and from now on
                        self.no_blocks.setdefault(meter.address, set()).add(item.di)
                    reads.extendleft(reversed([Read(find(name, meter.edition), (name,)) for name in left]))
                if reply.error is None and reply.complete:
                    self.stats["block_reads"] += 1
                    wanted = {f for name in step.serves if name not in left for f in fields_of(name, meter.edition)}
                    outcome.readings += self._readings(meter, meter.link, plan, reply, stamp, only=wanted)
                continue
            if reply.error is not None:
                no_data = reply.edition == 2007 and reply.error == Error2007.NO_DATA
                outcome.ok = False
                outcome.reason = Reason.NO_DATA if no_data else Reason.ABNORMAL_REPLY
                outcome.detail = f"{step.serves[0]}: {','.join(error_names(reply.error))}"
                continue
            outcome.readings += self._readings(meter, meter.link, plan, reply, stamp)  # configured link: bounded tag
        outcome.duration = time.time() - started
        return outcome

    def plan(self, meter: MeterConfig, items: Sequence[str]) -> list[Read]:
        """The reads for these items of this meter: merged into block reads where that saves bus time."""
        avoid = frozenset(self.no_blocks.get(meter.address, ()))
        key = (tuple(items), meter.edition, meter.tariffs, avoid)
        reads = self._plans.get(key)
        if reads is None:
            if len(self._plans) >= PLAN_CACHE:
                self._plans.clear()
            if self.merge_blocks:
                reads = plan_reads(items, meter.edition, tariffs=meter.tariffs, avoid=avoid)
            else:
                reads = [Read(find(name, meter.edition), (name,)) for name in items]
            self._plans[key] = reads
        return reads

    async def _exchange(self, bus: Bus, meter: MeterConfig, di: int, priority: Priority) -> Reply:
        """One item: a single frame almost always; a `ReadSequence` takes over when the meter has more."""
        address, edition, tariffs = meter.address, meter.edition, meter.tariffs
        timing = self.timing_for(meter)
        reply = self._decode(await bus.transact(read_request(address, di, edition), address, priority=priority,
                                                timing=timing), meter)
        if reply.error is not None or (reply.di == di and not reply.more):
            return reply
        sequence = ReadSequence(address, di, edition, tariffs=tariffs)
        request: bytes | None = self._feed(sequence, reply, address)
        while request is not None:
            frame = await bus.transact(request, address, priority=priority, timing=timing)
            request = self._feed(sequence, self._decode(frame, meter), address)
        assert sequence.reply is not None
        return sequence.reply

    @staticmethod
    def _decode(frame: Frame | None, meter: MeterConfig) -> Reply:
        if frame is None:
            raise BadFrame("no frame")
        try:
            return decode(frame, meter.edition, tariffs=meter.tariffs)
        except DecodeError as exc:
            raise BadFrame(f"undecodable reply from {meter.address}: {exc}") from exc

    @staticmethod
    def _feed(sequence: ReadSequence, reply: Reply, address: str) -> bytes | None:
        try:
            return sequence.feed(reply)
        except DecodeError as exc:
            raise BadFrame(f"undecodable reply from {address}: {exc}") from exc

    async def _freeze_time(self, bus: Bus, meter: MeterConfig, di: int, priority: Priority) -> float:
        reply = await self._exchange(bus, meter, di, priority)
        values = list(reply.values.values())
        if reply.error is not None or not values or not isinstance(values[0].value, dt.datetime):
            raise BadFrame(f"{meter.address} gave no usable freeze time for {di:08X}")
        return values[0].value.replace(tzinfo=self.tz).timestamp()

    def _readings(self, meter: MeterConfig, link: str, plan: str, reply: Reply, stamp: float | None, *,
                  only: set[str] | None = None) -> list[Reading]:
        """The reply's quantities as readings (`only` these, for a block read standing in for singles)."""
        collected = time.time()
        out = []
        quality = Quality.GOOD if reply.complete else Quality.LENGTH_MISMATCH
        for name, q in reply.values.items():
            if only is not None and name not in only:
                continue
            raw = q.value
            value: Value = raw
            if type(raw) is not float:  # the bulk are floats; the rest: freeze times, dates, ints, text
                if "_freeze_time_" in name:
                    if stamp is None and isinstance(raw, dt.datetime):
                        stamp = raw.replace(tzinfo=self.tz).timestamp()
                    continue
                if isinstance(raw, dt.datetime | dt.date | dt.time):
                    value = raw.isoformat()
            out.append(Reading(meter.address, name, value, q.unit, stamp if stamp is not None else collected,
                               collected, self.station, link, plan, stamp is not None,
                               Quality.INVALID if q.flags and "invalid" in q.flags else quality))
        return out
