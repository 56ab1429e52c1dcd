"""The prepaid policy with the real control engine against a metersim meter on a real TCP socket:
routine polls drain the balance to alarm and trip on the meter, a payment restores it at once,
and restarts never send a control frame twice (counted at the simulated meter)."""

from __future__ import annotations

import time

import pytest

from gateway.prepaid import Settings, ledger
from tests.gateway.prepaid.station import PREPAID, M, Station, holds, until, verified


@pytest.fixture
async def station(tmp_path, free_port):
    async with Station(tmp_path, free_port) as s:
        yield s


async def test_drain_alarm_trip_then_a_payment_restores_at_once_and_a_restart_sends_nothing_twice(station):
    relay = station.meter.relay
    prepaid = station.prepaid
    await prepaid.upsert_account(M, Settings(price=1_000_000, alarm=300))  # 1.00 per kWh; alarm at 3.00
    await prepaid.set_balance(M, "5.00", "bill-1")

    await verified(station, f"prepaid:{M}:1:alarm")
    assert relay.alarm and not relay.is_open
    await verified(station, f"prepaid:{M}:2:trip")
    assert relay.is_open and station.prepaid.account(M)["state"] == "tripped"
    assert station.frames() == 2

    result = await prepaid.pay(M, "20", "pay-1")
    # committed by the control engine before pay() returned: ahead of the next routine poll
    close, release = result["actions"]
    assert (close["action"], release["action"]) == ("close", "alarm_release") and close["command_id"]
    assert (await station.control.get(close["command_id"])).request_id == f"prepaid:{M}:3:close"
    await verified(station, f"prepaid:{M}:3:close")
    await verified(station, f"prepaid:{M}:3:alarm_release")
    assert not relay.is_open and not relay.alarm and station.frames() == 4
    await until(lambda: holds(prepaid.account(M)["pending_actions"] == []), "every action finished")
    assert prepaid.account(M)["last_action"]["result"] == "verified"

    await station.stop_daemon()
    await station.start_daemon()  # a restart: the same journal file, new Control and Prepaid
    readings = station.prepaid.stats["readings"]
    await until(lambda: holds(station.prepaid.stats["readings"] >= readings + 5), "polls after the restart")
    assert station.frames() == 4 and len(await station.control.list(M)) == 4
    assert station.prepaid.account(M)["state"] in ("normal", "alarmed")


async def test_a_decision_persisted_just_before_a_crash_is_sent_once(station):
    await station.prepaid.upsert_account(M, Settings(price=0))  # no drain: only the balance decides
    await station.stop_daemon()

    async def crashed_after_persisting(journal):
        """What a crash right after the ledger's commit leaves: a trip decided, never submitted."""
        rules = ledger.Rules.of(PREPAID)
        await journal.write(ledger.update, ledger.Update(M, -100, time.time(), "bill-1", {}), rules, time.time())

    await station.start_daemon(before=crashed_after_persisting)
    await verified(station, f"prepaid:{M}:1:trip")
    assert station.meter.relay.is_open and station.frames() == 2  # alarm + trip
    for _ in range(2):  # and again: the same keys return the same commands
        await station.stop_daemon()
        await station.start_daemon()
        await until(lambda: holds(not station.prepaid.account(M)["pending_actions"]), "nothing pending")
    assert station.frames() == 2 and len(await station.control.list(M)) == 2
