"""Stop control in every open state, start a new one on the reopened journal: each command ends right,
and the meter counts exactly one accepted 1C for it."""

from __future__ import annotations

import copy

from gateway.control import store
from gateway.control.model import State
from gateway.control.store import events_of
from simulators.faults import FaultRule
from tests.gateway.control.rig import Rig, state_is

M1, M2, M3 = "000000000001", "000000000002", "000000000003"
SLOW = {"retry_every": 60.0, "trip_retry_every": 60.0}  # a failed attempt is not retried before the restart


async def test_pending_is_executed_after_a_restart(tmp_path, free_port):
    async with Rig(tmp_path, free_port) as rig:  # link down: the close stays pending
        close = await rig.control.submit(M1, "close")
        await rig.stop_control()
        await rig.serve()
        await rig.restart()
        done = await rig.wait(close)
        assert done.state is State.VERIFIED and done.attempts == 1
        assert rig.accepted(M1) == 1


async def test_sent_and_carried_out_is_not_sent_again(tmp_path, free_port):
    async with Rig(tmp_path, free_port, **SLOW) as rig:
        await rig.serve()
        rig.line.faults.replace([FaultRule("no_reply", meter=M1)])  # the meter acts, its answer is lost
        alarm = await rig.control.submit(M1, "alarm")
        await rig.until(lambda: rig.meters[M1].truth["control_accepted"] == 1, "the meter took the 1C")
        await rig.stop_control()
        assert (await rig.journal.read(events_of, alarm.id))[-1]["state"] == "sent"
        rig.line.faults.rules = []
        await rig.restart()
        done = await rig.wait(alarm)
        assert done.state is State.VERIFIED and done.attempts == 1  # status word 3 showed it: no resend
        assert "earlier 1C reached it" in [e["detail"] for e in await rig.journal.read(events_of, alarm.id)][-2]
        assert rig.accepted(M1) == 1 and rig.meters[M1].truth["control_refused"] == 0


async def test_sent_and_lost_is_sent_once_more(tmp_path, free_port):
    async with Rig(tmp_path, free_port, **SLOW) as rig:
        await rig.serve()
        assert (await rig.wait(await rig.control.submit(M3, "trip"))).state is State.VERIFIED
        rig.line.faults.replace([FaultRule("dead", meter=M3)])  # the meter hears nothing
        close = await rig.control.submit(M3, "close")
        await rig.wait(close, lambda c: c.state is State.SENT and c.attempts == 1)
        await rig.until(lambda: rig.meters[M3].truth["fault_dead"] >= 1, "the 1C was lost on the line")
        await rig.stop_control()
        rig.line.faults.rules = []
        await rig.restart()
        done = await rig.wait(close)
        assert done.state is State.VERIFIED and done.attempts == 2
        assert rig.accepted(M3) == 2 and not rig.meters[M3].relay.is_open  # the trip, and the close once


async def test_acknowledged_is_verified_after_a_restart(tmp_path, free_port):
    async with Rig(tmp_path, free_port, verify_timeout=10.0) as rig:
        await rig.serve()
        rig.meters[M1].relay.trip_delay_s = 1
        trip = await rig.control.submit(M1, "trip")
        await rig.wait(trip, state_is(State.ACKNOWLEDGED))
        await rig.restart()
        done = await rig.wait(trip)
        assert done.state is State.VERIFIED and done.detail == "relay open" and done.attempts == 1
        assert rig.accepted(M1) == 1
        states = [e["state"] for e in await rig.journal.read(events_of, trip.id)]
        assert states == ["pending", "sent", "acknowledged", "verified"]


async def test_a_lane_behind_the_journal_catches_up_instead_of_acting(tmp_path, free_port):
    """A write whose caller was cancelled may still commit: the journal, not memory, has the last word."""
    async with Rig(tmp_path, free_port) as rig:  # link down: the alarm waits
        alarm = await rig.control.submit(M1, "alarm")
        behind = copy.deepcopy(alarm)
        behind.state, behind.fail_reason, behind.updated = State.EXPIRED, "never_reached", rig.clock()
        assert await rig.journal.write(store.transition, behind, State.PENDING)
        await rig.serve()
        done = await rig.wait(alarm)
        assert done.state is State.EXPIRED and done.fail_reason == "never_reached"
        assert rig.control_frames(M1) == 0
