"""Latest intent wins, quiet hours, the trip rate limit and dry run, on a real TCP bus."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from gateway.control.model import State
from tests.gateway.control.rig import TZ, Rig, state_is

M1, M2, M3 = "000000000001", "000000000002", "000000000003"


def shifted_to(hh: int, mm: int, ss: int) -> float:
    """Seconds to add to now for the station's clock to read the next hh:mm:ss (always ahead of the
    meters' real clocks, so the 1C deadlines are in their future)."""
    now = dt.datetime.now(TZ)
    target = now.replace(hour=hh, minute=mm, second=ss, microsecond=0)
    if target <= now:
        target += dt.timedelta(days=1)
    return target.timestamp() - now.timestamp()


async def test_a_close_supersedes_a_trip_waiting_for_the_link(tmp_path, free_port):
    async with Rig(tmp_path, free_port) as rig:  # the link is down
        trip = await rig.control.submit(M1, "trip", reason="balance below zero")
        close = await rig.control.submit(M1, "close", reason="paid")
        gone = await rig.control.get(trip.id)
        assert gone.state is State.SUPERSEDED and gone.fail_reason == f"superseded by {close.id}"
        alarm = await rig.control.submit(M1, "alarm")  # another group: supersedes nothing
        await rig.serve()
        assert (await rig.wait(close)).state is State.VERIFIED
        assert (await rig.wait(alarm)).state is State.VERIFIED
        assert (await rig.control.get(trip.id)).attempts == 0
        assert rig.control_frames(M1) == 2  # the close and the alarm; the trip never went on the wire
        assert not rig.meters[M1].relay.is_open
        assert rig.control.counters["superseded"] == 1


async def test_a_close_stops_the_verification_of_a_delayed_trip(tmp_path, free_port):
    async with Rig(tmp_path, free_port, verify_timeout=10.0) as rig:
        await rig.serve()
        rig.meters[M2].relay.trip_delay_s = 30
        trip = await rig.control.submit(M2, "trip")
        await rig.wait(trip, state_is(State.ACKNOWLEDGED))
        close = await rig.control.submit(M2, "close")
        assert (await rig.control.get(trip.id)).state is State.SUPERSEDED
        done = await rig.wait(close)
        assert done.state is State.VERIFIED and done.detail == "relay closed"
        relay = rig.meters[M2].relay
        assert not relay.is_open and relay.trip_at is None and not relay.trip_command
        assert (await rig.control.get(trip.id)).state is State.SUPERSEDED  # never verified later


async def test_quiet_hours_refuse_trips_but_not_restores(tmp_path, free_port):
    offset = shifted_to(21, 0, 0)
    async with Rig(tmp_path, free_port, clock=lambda: time.time() + offset, quiet_hours="20:00-08:00") as rig:
        await rig.serve()
        trip = await rig.control.submit(M1, "trip")
        assert trip.state is State.FAILED and trip.fail_reason == "quiet_hours"
        assert "20:00-08:00" in trip.detail
        assert (await rig.wait(await rig.control.submit(M1, "close"))).state is State.VERIFIED
        assert rig.control_frames(M1) == 1
        assert rig.control.counters["refused_quiet_hours"] == 1


async def test_a_holiday_is_quiet_all_day(tmp_path, free_port):
    offset = shifted_to(12, 0, 0)
    today = dt.datetime.fromtimestamp(time.time() + offset, TZ).date()
    async with Rig(tmp_path, free_port, clock=lambda: time.time() + offset, holidays=[today]) as rig:
        await rig.serve()
        trip = await rig.control.submit(M1, "trip")
        assert trip.state is State.FAILED and "holiday" in trip.detail


async def test_quiet_hours_defer_a_trip_until_they_end_or_expire_it(tmp_path, free_port):
    offset = shifted_to(7, 59, 59)
    async with Rig(tmp_path, free_port, clock=lambda: time.time() + offset, quiet_hours="20:00-08:00",
                   quiet_mode="defer") as rig:
        await rig.serve()
        late = await rig.control.submit(M2, "trip", valid_for=0.3)
        trip = await rig.control.submit(M1, "trip")
        assert trip.state is State.PENDING
        expired = await rig.wait(late)
        assert expired.state is State.EXPIRED and expired.fail_reason == "quiet_hours"
        done = await rig.wait(trip)
        assert done.state is State.VERIFIED
        assert dt.datetime.fromtimestamp(done.sent_at, TZ).time() >= dt.time(8, 0)
        assert rig.control_frames(M2) == 0 and rig.accepted(M1) == 1
        assert rig.control.counters["quiet_deferred"] >= 2


async def test_the_31st_trip_in_a_minute_is_refused(tmp_path, free_port):
    async with Rig(tmp_path, free_port, count=31, rate_mode="refuse") as rig:
        await rig.serve()
        commands = [await rig.control.submit(a, "trip") for a in rig.meters]
        assert [c.state for c in commands[:30]] == [State.PENDING] * 30
        assert commands[30].state is State.FAILED and commands[30].fail_reason == "rate_limited"
        assert (await rig.wait(await rig.control.submit(commands[30].meter, "alarm"))).state is State.VERIFIED
        for c in commands[:30]:
            assert (await rig.wait(c)).state is State.VERIFIED
        assert rig.accepted() == 31 and rig.control_frames(commands[30].meter) == 1
        assert rig.control.counters["refused_rate"] == 1


async def test_the_31st_trip_in_a_minute_is_deferred(tmp_path, free_port):
    async with Rig(tmp_path, free_port, count=31, verify_timeout=10.0) as rig:
        await rig.serve()
        commands = [await rig.control.submit(a, "trip", valid_for=8.0) for a in rig.meters]
        ends = [await rig.wait(c) for c in commands]
        states = sorted(c.state for c in ends)
        assert states.count(State.VERIFIED) == 30 and states.count(State.EXPIRED) == 1
        late = next(c for c in ends if c.state is State.EXPIRED)
        assert late.fail_reason == "rate_limited" and late.attempts == 0
        assert rig.accepted() == 30 and rig.control_frames(late.meter) == 0
        assert rig.control.counters["rate_deferred"] >= 1


@pytest.mark.parametrize("action", ["trip", "close"])
async def test_dry_run_records_and_guards_but_sends_nothing(tmp_path, free_port, action):
    async with Rig(tmp_path, free_port, dry_run=True, hold_list=[M3]) as rig:
        await rig.serve()
        command = await rig.control.submit(M1, action, request_id="dry-1")
        assert command.state is State.DRY_RUN and command.dry_run
        assert (await rig.control.get(command.id)).state is State.DRY_RUN
        held = await rig.control.submit(M3, "trip")
        assert held.state is State.FAILED and held.fail_reason == "hold"
        assert sum(rig.control_frames(a) for a in rig.meters) == 0
        assert rig.line.truth["requests"] == 0
