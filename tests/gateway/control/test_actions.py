"""Every action against simulated meters on a real TCP bus ends in the right state."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from gateway.control.config import GroupAuth
from gateway.control.model import Action, Conflict, ControlError, State, UnknownAction, UnknownMeter
from gateway.control.store import events_of
from gateway.model import Reading
from simulators.faults import FaultRule
from tests.gateway.control.rig import Rig, state_is

M1, M2, M3 = "000000000001", "000000000002", "000000000003"


@pytest.fixture
async def rig(tmp_path, free_port):
    async with Rig(tmp_path, free_port) as rig:
        await rig.serve()
        yield rig


async def test_each_action_is_verified_on_the_meter(rig):
    relay = rig.meters[M1].relay
    steps = [(Action.ALARM, lambda: relay.alarm), (Action.ALARM_RELEASE, lambda: not relay.alarm),
             (Action.TRIP, lambda: relay.is_open), (Action.CLOSE, lambda: not relay.is_open),
             (Action.HOLD, lambda: relay.hold), (Action.HOLD_RELEASE, lambda: not relay.hold)]
    for action, truth in steps:
        command = await rig.control.submit(M1, action, reason="test", actor="pytest")
        assert command.state is State.PENDING
        done = await rig.wait(command)
        assert done.state is State.VERIFIED, done.public()
        assert done.attempts == 1
        assert truth(), action
    assert rig.accepted(M1) == len(steps)
    trail = [e["state"] for e in await rig.journal.read(events_of, command.id)]
    assert trail == ["pending", "sent", "acknowledged", "verified"]
    assert rig.control.counters["verified"] == len(steps)
    assert rig.control.relay_state(M1) == {"relay_open": False, "trip_commanded": False, "pre_trip_alarm": False,
                                           "hold": False}


async def test_trip_with_a_trip_delay_is_verified_after_the_delay(rig):
    rig.meters[M2].relay.trip_delay_s = 1
    command = await rig.control.submit(M2, "trip")
    acked = await rig.wait(command, state_is(State.ACKNOWLEDGED, State.VERIFIED))
    assert acked.state is State.ACKNOWLEDGED  # the delay runs: commanded, not open yet
    done = await rig.wait(command)
    assert done.state is State.VERIFIED and done.detail == "relay open"
    assert done.relay["relay_open"] and done.relay["trip_commanded"]
    assert rig.meters[M2].relay.is_open


async def test_allow_close_waits_for_the_customer_and_the_poll_notices_the_closure(rig):
    meter = rig.meters[M3]
    done = await rig.wait(await rig.control.submit(M3, "trip"))
    assert done.state is State.VERIFIED
    command = await rig.control.submit(M3, "allow_close")
    done = await rig.wait(command)
    assert done.state is State.VERIFIED
    assert done.detail == "close allowed, waiting for the customer"
    assert meter.relay.is_open
    async with rig.control.changes() as changes:
        assert meter.relay.press_button(meter, time.time())
        word = meter.status_word(3, 0.0)
        rig.control.observe([Reading(M3, "status_word_3", word, "", 0.0, 0.0)])
        change = await asyncio.wait_for(anext(changes), 10)
    assert change.id == command.id and change.state is State.VERIFIED
    assert change.detail == "closed by the customer" and not change.relay["relay_open"]
    trail = await rig.journal.read(events_of, command.id)
    assert [e["detail"] for e in trail][-2:] == ["close allowed, waiting for the customer", "closed by the customer"]
    assert rig.control.counters["customer_closures"] == 1
    rig.control.observe([Reading(M3, "status_word_3", word, "", 0.0, 0.0)])  # a second poll: nothing new
    await asyncio.sleep(0.1)
    assert len(await rig.journal.read(events_of, command.id)) == len(trail)


async def test_a_held_meter_refuses_trip(rig):
    assert (await rig.wait(await rig.control.submit(M1, "hold"))).state is State.VERIFIED
    accepted = rig.accepted(M1)
    done = await rig.wait(await rig.control.submit(M1, "trip"))
    assert done.state is State.FAILED and done.fail_reason == "hold"
    assert done.attempts == 0 and rig.accepted(M1) == accepted  # the status word said hold: never sent
    assert not rig.meters[M1].relay.is_open


async def test_the_hold_list_refuses_trip_at_submission(tmp_path, free_port):
    async with Rig(tmp_path, free_port, hold_list=[M2]) as rig:
        await rig.serve()
        command = await rig.control.submit(M2, "trip")
        assert command.state is State.FAILED and command.fail_reason == "hold"
        assert (await rig.control.get(command.id)).state is State.FAILED
        assert rig.control.counters["refused_hold"] == 1
        assert (await rig.wait(await rig.control.submit(M2, "alarm"))).state is State.VERIFIED  # only trips
        assert rig.control_frames(M2) == 1


async def test_wrong_password_fails_unauthorised(tmp_path, free_port, caplog):
    caplog.set_level(logging.DEBUG, logger="gateway.control")
    async with Rig(tmp_path, free_port, groups={"default": GroupAuth(password="123456")}) as rig:
        await rig.serve()
        done = await rig.wait(await rig.control.submit(M1, "trip"))
        assert done.state is State.FAILED and done.fail_reason == "unauthorised"
        assert "unauthorised" in caplog.text and "123456" not in caplog.text
        trail = await rig.journal.read(events_of, done.id)
        assert "123456" not in repr(rig.control.config) and "123456" not in str(trail)
        assert rig.meters[M1].truth["control_refused"] == 1


async def test_a_stuck_relay_fails_not_verified(tmp_path, free_port):
    async with Rig(tmp_path, free_port, verify_timeout=0.6) as rig:
        await rig.serve()
        rig.line.faults.replace([FaultRule("relay_stuck", meter=M1)])
        done = await rig.wait(await rig.control.submit(M1, "trip"))
        assert done.state is State.FAILED and done.fail_reason == "not_verified"
        assert done.acknowledged_at is not None and not done.relay["relay_open"]
        assert rig.accepted(M1) == 1


async def test_link_down_until_after_the_deadline_expires_never_sent(tmp_path, free_port):
    async with Rig(tmp_path, free_port) as rig:  # nothing listens on the port: the link never comes up
        command = await rig.control.submit(M1, "close", valid_for=0.6)
        done = await rig.wait(command)
        assert done.state is State.EXPIRED and done.attempts == 0
        assert done.fail_reason == "link_down" and "deadline passed" in done.detail
        await rig.serve()
        await asyncio.sleep(0.3)
        assert rig.accepted() == 0 and rig.control_frames(M1) == 0


async def test_same_request_id_is_one_command_and_one_frame(rig):
    first = await rig.control.submit(M1, "alarm", request_id="pay-42")
    again = await rig.control.submit(M1, "alarm", request_id="pay-42")
    assert again.id == first.id
    await rig.wait(first)
    third = await rig.control.submit(M1, Action.ALARM, request_id="pay-42")
    assert third.id == first.id and third.state is State.VERIFIED
    with pytest.raises(Conflict):
        await rig.control.submit(M1, "trip", request_id="pay-42")
    with pytest.raises(Conflict):
        await rig.control.submit(M2, "alarm", request_id="pay-42")
    assert rig.control_frames(M1) == 1
    assert len(await rig.control.list(M1)) == 1
    assert rig.control.counters["duplicates"] == 2


async def test_bad_requests_get_typed_errors(rig):
    with pytest.raises(UnknownMeter):
        await rig.control.submit("999999999999", "trip")
    with pytest.raises(UnknownAction):
        await rig.control.submit(M1, "explode")
    with pytest.raises(ControlError):
        await rig.control.submit(M1, "trip", valid_for=0)
    with pytest.raises(ControlError):
        await rig.control.submit(M1, "trip", valid_for=30 * 86400)
    with pytest.raises(ControlError, match="address"):
        await rig.control.submit("12x", "trip")
    with pytest.raises(ControlError, match="request_id"):
        await rig.control.submit(M1, "trip", request_id="x" * 201)
    assert await rig.control.list() == []
    assert rig.control.counters["rejected"] == 6
    assert (await rig.control.submit("1", "alarm")).meter == M1  # short forms of an address are the meter
