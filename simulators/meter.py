"""One simulated DL/T 645 meter: state, clock, electrical values and its answers to requests.

`answer(frame, now)` is the whole wire contract: it takes a request frame
addressed to anyone and returns the reply frames this meter would send
(none for broadcasts, other meters' addresses, or functions that get no
reply). Time is always passed in (UTC seconds), so tests can drive a meter
through days in microseconds.
"""

from __future__ import annotations

import datetime as dt
import math
from collections import Counter
from typing import Any

from protocols.dlt645 import (
    BROADCAST,
    DecodeError,
    Error1997,
    Error2007,
    Frame,
    abbreviated,
    error_reply,
    lookup,
    normal_reply,
    parse_control_payload,
    parse_request,
    read_reply,
)
from protocols.dlt645.address import matches
from protocols.dlt645.formats import Time
from simulators.events import ENERGIES, Events
from simulators.profile import Consumption, mix, phase_wave
from simulators.registers import Registers, to_datetime
from simulators.relay import Relay

SYNC_TIME = Time("YYMMDDhhmmss")
DEFAULT_PASSWORDS = {2: "000000", 4: "000000"}
WRITABLE_CLOCK = {0x04000101: "date", 0x04000102: "time", 0xC010: "date", 0xC011: "time"}


class Meter:
    """A meter that behaves like a real one; see the module docstring for the contract.

    Slotted and lazy (shared load shapes, no registers object, follow-up and
    written-parameter stores created on first use): a fleet holds 100,000.
    """

    __slots__ = ("_balance", "_born", "_follow", "_last_reply", "address", "baud", "clock_offset_s",
                 "clock_set_at", "consumption", "drift_ppm", "edition", "events", "load_override", "meter_number",
                 "passwords", "pf", "phases", "prepaid", "price", "relay", "relay_stuck", "seed", "tariffs", "truth",
                 "tz_offset_s", "written")

    def __init__(self, address: str, *, edition: int = 2007, seed: int | None = None, phases: int = 1,
                 tariffs: int = 4, baud: int = 2400, passwords: dict[int, str] | None = None,
                 prepaid: bool = True, price: float = 0.5, balance: float = 100.0, trip_delay_s: int = 0,
                 tz_offset_s: float = 8 * 3600, epoch: float, now: float) -> None:
        self.address = address
        self.edition = edition
        self.seed = int(address) if seed is None and address.isdigit() else (seed or 0)
        self.phases = phases
        self.tariffs = tariffs
        self.baud = baud
        self.passwords = passwords if passwords is not None else DEFAULT_PASSWORDS  # replaced, never mutated
        self.meter_number = address
        self.prepaid = prepaid
        self.price = price
        self.tz_offset_s = tz_offset_s
        self.clock_offset_s = 0.0
        self.drift_ppm = 0.0
        self.clock_set_at = now
        s = self.seed
        total = 500 + 15000 * mix(s, 1)
        split = [0.1, 0.3, 0.35, 0.25]
        self.consumption = Consumption(s, 0.2 + 1.8 * mix(s, 2), epoch + tz_offset_s,
                                       [total] + [total * f for f in split])
        self.pf = 0.9 + 0.09 * mix(s, 3)
        self.load_override: float | None = None
        self.relay = Relay(trip_delay_s)
        self.relay_stuck = False
        self.events = Events.with_history(s, self.clock_local(now))
        self.written: dict[str, bytes] | None = None
        self.truth: Counter[str] = Counter()
        self._born = now
        self._balance: tuple[float, float | None] = (balance, None)  # energy reference taken on first use
        self._follow: dict[int, list[bytes]] | None = None
        self._last_reply: list[bytes] | None = None

    # --- time ------------------------------------------------------------------------------------
    def real_local(self, now: float) -> float:
        return now + self.tz_offset_s

    def clock_local(self, now: float) -> float:
        return self.real_local(now) + self.clock_offset_s + self.drift_ppm * 1e-6 * (now - self.clock_set_at)

    def clock_datetime(self, now: float) -> dt.datetime:
        return to_datetime(self.clock_local(now))

    def set_clock(self, clock: dt.datetime, now: float) -> None:
        self.clock_offset_s = (clock - dt.datetime(1970, 1, 1)).total_seconds() - self.real_local(now)
        self.clock_set_at = now

    # --- values ----------------------------------------------------------------------------------
    def registers_at(self, real: float) -> list[float]:
        return self.consumption.energy(real)

    def load_kw(self, real: float) -> float:
        return self.consumption.power(real)

    def set_load(self, kw: float | None, now: float) -> None:
        """Override the load (None = back to the daily profile). Zero while the relay is open."""
        self.relay.settle(self, now)
        self.load_override = kw
        if not self.relay.is_open:
            self.consumption.change(self.real_local(now), "profile" if kw is None else "fixed", kw or 0.0)

    def balance(self, real: float) -> float:
        start, at_energy = self._balance
        if at_energy is None:
            at_energy = self.consumption.energy(self.real_local(self._born))[0]
            self._balance = (start, at_energy)
        return round(start - self.price * (self.consumption.energy(real)[0] - at_energy), 2)

    def electrical(self, name: str, real: float) -> float:
        phase = name[-1] if name[-2:] in ("_a", "_b", "_c") else ""
        if phase and self.phases == 1 and phase != "a":
            return 0.0
        k = "abc".index(phase) if phase else 0
        volts = round(220.0 + 4.0 * phase_wave(self.seed, real, 3100.0, 20 + k) + 0.4 * mix(self.seed, int(real)), 1)
        kw = self.load_kw(real) / (self.phases if phase else 1)
        if name.startswith("voltage_harmonic") or name.startswith("current_harmonic"):
            return round(0.3 + mix(self.seed, 30, int(name.rsplit("_", 1)[1])), 2)
        base = name[: -2] if phase else name
        values = {
            "voltage": volts,
            "current": round(kw * 1000 / (volts * self.pf), 3) if phase else 0.0,
            "active_power": round(kw, 4),
            "reactive_power": round(kw * math.tan(math.acos(self.pf)), 4),
            "apparent_power": round(kw / self.pf, 4),
            "power_factor": round(self.pf, 3),
            "phase_angle": round(math.degrees(math.acos(self.pf)) + 120.0 * k, 1),
            "voltage_thd": round(1.5 + mix(self.seed, 31, k), 2),
            "current_thd": round(3.0 + 2 * mix(self.seed, 32, k), 2),
        }
        return values[base]

    def status_word(self, n: int, real: float) -> int:
        if n == 3:
            prepaid = 0x0200 if self.prepaid else 0
            return self.relay.word_bits() | prepaid
        return 0

    def relay_record(self, when: float, operator: str) -> dict[str, Any]:
        energy = self.registers_at(self.real_local(when))[0]
        record: dict[str, Any] = {"time": self.clock_datetime(when), "operator": operator}
        record.update({f"{e}_energy": (round(energy, 2) if e == "forward_active" else 0.0) for e in ENERGIES})
        return record

    # --- the wire contract ---------------------------------------------------------------------
    def addressed(self, address: str) -> bool:
        return address == self.address or (address != BROADCAST and "A" in address and matches(address, self.address))

    def answer(self, frame: Frame, now: float) -> list[bytes]:
        """Reply frames for a request (empty: silence). Counts what it received and answered."""
        broadcast = frame.address == BROADCAST
        if not broadcast and not self.addressed(frame.address):
            return []
        self.truth["received"] += 1
        self.relay.settle(self, now)
        try:
            request = parse_request(frame, self.edition)
        except DecodeError:
            self.truth["malformed"] += 1
            return [] if broadcast else [self._error(frame.control & 0x1F, 0x01)]
        replies = self._dispatch(request.function, request.di, request.seq, request.body, frame=frame, now=now)
        if broadcast:
            return []
        if replies:
            self.truth["answered"] += 1
            if request.function not in (0x03,):
                self._last_reply = replies
        return replies

    def _error(self, function: int, err: int) -> bytes:
        return error_reply(self.address, function, err)

    def _dispatch(self, fn: int, di: int | None, seq: int | None, body: bytes, *, frame: Frame,
                  now: float) -> list[bytes]:
        old = self.edition == 1997
        no_data = Error1997.BAD_DI if old else Error2007.NO_DATA
        if fn == 0x08:
            self._set_clock_from(body, now)
            return []
        if fn in (0x11, 0x01) and di is not None:
            payload = None if body else Registers(self).payload(di, now)  # load-profile forms: not kept
            if payload is None:
                return [self._error(fn, no_data)]
            frames = read_reply(self.address, di, payload, self.edition)
            if len(frames) > 1:
                self._follow = {di: frames[1:]}
            return frames[:1]
        if fn in (0x12, 0x02) and di is not None:
            pending = (self._follow or {}).get(di) or []
            index = (seq or 1) - 1 if not old else 0
            if index >= len(pending):
                return [self._error(fn, no_data)]
            frame_bytes = pending[index]
            if old and self._follow is not None:
                self._follow[di] = pending[1:]
            return [frame_bytes]
        if fn == 0x03 and old:
            return self._last_reply or []
        if fn == 0x13 and not old and "A" in frame.address:
            return [normal_reply(self.address, 0x13, bytes.fromhex(self.address)[::-1])]
        if fn in (0x15, 0x0A):
            return self._write_address(fn, body)
        if fn == 0x1C and not old:
            try:
                payload_1c = parse_control_payload(body)
            except DecodeError:
                return [self._error(fn, Error2007.OTHER)]
            err = self.relay.control(self, payload_1c, now)
            self.truth["control_accepted" if not err else "control_refused"] += 1
            return [self._error(fn, err)] if err else [normal_reply(self.address, fn)]
        return self._admin(fn, di, body, now)

    def _write_address(self, fn: int, body: bytes) -> list[bytes]:
        if len(body) != 6:
            return [self._error(fn, 0x01)]
        self.address = body[::-1].hex().upper()
        return [normal_reply(self.address, fn)] if fn == 0x15 else []

    def _check(self, level: int, password: bytes) -> bool:
        return self.passwords.get(level) == password[::-1].hex()

    def _admin(self, fn: int, di: int | None, body: bytes, now: float) -> list[bytes]:
        """Writes, password change, clears, freeze, baud and output: checked, recorded, answered."""
        old = self.edition == 1997
        unauthorized = Error1997.BAD_PASSWORD if old else Error2007.UNAUTHORIZED
        if fn in (0x14, 0x04) and di is not None:
            auth_len = 4 if old else 8
            if len(body) < auth_len or not self._check(body[0], body[1:4]):
                return [self._error(fn, unauthorized)]
            return self._write(fn, di, body[auth_len:], now)
        if fn in (0x19, 0x1A, 0x1B, 0x10):
            if len(body) < 4 or not self._check(body[0], body[1:4]):
                return [self._error(fn, unauthorized)]
            operator = body[4:8][::-1].hex() if len(body) >= 8 else "00000000"
            self._clear(fn, operator, now)
            return [normal_reply(self.address, fn)]
        if fn in (0x18, 0x0F):
            pair = body  # 2007: the DI 04000C0n was split off by parse_request
            if len(pair) != 8 or not self._check(pair[0], pair[1:4]):
                return [self._error(fn, unauthorized)]
            self.passwords = {**self.passwords, pair[4]: pair[5:8][::-1].hex()}
            return [normal_reply(self.address, fn, pair[4:8])]
        if fn == 0x16:
            return [normal_reply(self.address, fn)]
        if fn in (0x17, 0x0C) and len(body) == 1:
            return [normal_reply(self.address, fn, body)]  # acknowledged; the bus keeps its rate
        if fn == 0x1D and len(body) == 1:
            return [normal_reply(self.address, fn, body)]
        return [self._error(fn, 0x01)]

    def _write(self, fn: int, di: int, value: bytes, now: float) -> list[bytes]:
        item = lookup(di, self.edition)
        if item is None or item.width != len(value):
            return [self._error(fn, 0x01)]
        field = item.fields[0]
        if di in WRITABLE_CLOCK:
            decoded = field.fmt.decode(value)
            if not decoded:
                return [self._error(fn, 0x01)]
            current = self.clock_datetime(now)
            if WRITABLE_CLOCK[di] == "date":
                self.set_clock(dt.datetime.combine(decoded, current.time()), now)
            else:
                self.set_clock(dt.datetime.combine(current.date(), decoded), now)
            self.events.add("time_set", {"operator": "00000000", "before": current, "after": self.clock_datetime(now)})
        elif item.name == "trip_delay":
            self.relay.trip_delay_s = int(field.fmt.decode(value)) * 60
        else:
            self.written = {**(self.written or {}), item.name: value}
        self.events.add("programming", {"time": self.clock_datetime(now), "operator": "00000000",
                                        **{f"di_{k}": "00000000" for k in range(2, 11)}, "di_1": f"{di:08X}"})
        return [normal_reply(self.address, fn)]

    def _clear(self, fn: int, operator: str, now: float) -> None:
        when = self.clock_datetime(now)
        if fn == 0x1B:
            self.events.clear()
            self.events.add("event_clear", {"time": when, "operator": operator, "di": "FFFFFFFF"})
        elif fn == 0x1A:
            self.consumption.reset(self.real_local(now))
            record = {"time": when, "operator": operator}
            record.update({f"{e}_energy": 0.0 for e in ENERGIES})
            self.events.add("meter_clear", record)
        else:
            self.events.add("demand_clear", {"time": when, "operator": operator})

    def _set_clock_from(self, body: bytes, now: float) -> None:
        value = SYNC_TIME.decode(body) if len(body) == SYNC_TIME.width else None
        if not isinstance(value, dt.datetime):
            self.truth["bad_time_sync"] += 1
            return
        self.set_clock(value, now)

    # --- state for the API -----------------------------------------------------------------------
    def state(self, now: float) -> dict[str, Any]:
        self.relay.settle(self, now)
        real = self.real_local(now)
        energy = self.registers_at(real)
        return {
            "address": self.address,
            "edition": self.edition,
            "registers": {"forward_active_energy": round(energy[0], 2),
                          **{f"forward_active_energy_t{k}": round(energy[k], 2) for k in range(1, 5)}},
            "load_kw": round(self.load_kw(real), 4),
            "load_override_kw": self.load_override,
            "relay": self.relay.describe(now),
            "status_word_3": self.status_word(3, real),
            "clock": self.clock_datetime(now).isoformat(),
            "clock_offset_s": round(self.clock_local(now) - real, 3),
            "balance": self.balance(real) if self.prepaid else None,
            "events": dict(self.events.counts),
            "truth": dict(self.truth),
            "abbreviated": abbreviated(self.address) if self.address.isdigit() else None,
        }

