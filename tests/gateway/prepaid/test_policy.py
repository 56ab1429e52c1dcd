"""The Prepaid policy with a fake control engine (unit): readings drain the balance to alarm and trip,
a payment restores at once, a restart issues nothing twice, refusals and expiry are shown."""

from __future__ import annotations

import time

import pytest

from gateway.control.model import ControlError, State, UnknownMeter
from gateway.model import Quality
from gateway.prepaid import PrepaidError, Settings, store
from tests.gateway.prepaid.helpers import Daemon, FakeControl, M, energy, eventually


async def test_readings_drain_the_balance_to_alarm_then_trip_and_a_payment_restores_at_once(tmp_path):
    control = FakeControl()
    async with Daemon(tmp_path / "j.sqlite", control) as prepaid:
        await prepaid.upsert_account(M, Settings(price=500_000))  # 0.50 per kWh
        await prepaid.set_balance(M, "30.00", "bill-1", as_of=time.time() - 60)
        prepaid.observe([energy(1000.00, time.time())])  # the first reading after the update: the reference
        await eventually(lambda: prepaid.account(M)["estimated"])
        assert prepaid.account(M)["estimated_balance"] == "30.00" and control.calls == []
        prepaid.observe([energy(1020.00, time.time())])  # 20 kWh = 10.00 -> 20.00: at the alarm threshold
        await eventually(lambda: control.issued() == [(M, "alarm")])
        assert prepaid.account(M)["state"] == "alarmed"
        prepaid.observe([energy(1060.00, time.time())])  # 40 kWh more = 20.00 -> 0.00: trip
        await eventually(lambda: control.issued() == [(M, "alarm"), (M, "trip")])
        view = prepaid.account(M)
        assert view["state"] == "tripped" and view["estimated_balance"] == "0.00" and view["estimated"]
        assert [a["action"] for a in view["pending_actions"]] == ["alarm", "trip"]  # submitted, not finished

        result = await prepaid.pay(M, 50, "pay-1")
        # submitted before pay() returned: no waiting for a poll
        assert control.issued()[2:] == [(M, "close"), (M, "alarm_release")]
        assert [a["action"] for a in result["actions"]] == ["close", "alarm_release"]
        assert result["account"]["state"] == "normal" and result["account"]["estimated_balance"] == "50.00"
        assert control.calls[2][2] == f"prepaid:{M}:3:close"

        assert (await prepaid.pay(M, 50, "pay-1"))["outcome"] == "duplicate"
        assert len(control.calls) == 4 and prepaid.account(M)["estimated_balance"] == "50.00"


async def test_a_restart_issues_nothing_twice(tmp_path):
    control = FakeControl()
    control.error = OSError("the control journal is busy")  # the engine cannot take it yet
    async with Daemon(tmp_path / "j.sqlite", control) as prepaid:
        await prepaid.upsert_account(M, Settings(price=1_000_000))
        result = await prepaid.set_balance(M, "-1.00", "bill-1")
        assert result["actions"] == [] and prepaid.stats["submit_errors"] == 1
        assert [a["action"] for a in prepaid.account(M)["pending_actions"]] == ["alarm", "trip"]  # both persisted
    control.error = None
    async with Daemon(tmp_path / "j.sqlite", control) as prepaid:  # restart: re-submitted under the same keys
        await eventually(lambda: [c[2] for c in control.calls[1:]] == [f"prepaid:{M}:1:alarm", f"prepaid:{M}:1:trip"])
        await eventually(lambda: not prepaid.account(M)["pending_actions"] or
                         all(a["status"] == "submitted" for a in prepaid.account(M)["pending_actions"]))
    async with Daemon(tmp_path / "j.sqlite", control) as prepaid:  # and again: nothing is pending any more
        await prepaid.set_balance(M, "-1.00", "bill-1")  # the same update again: a duplicate, no new transition
        assert prepaid.account(M)["state"] == "tripped" and prepaid.account(M)["transitions"] == 1
    assert len(control.commands) == 2 and len(control.calls) == 3  # one failed try, then each command once


async def test_the_command_fate_is_the_accounts_last_action_result(tmp_path):
    control = FakeControl()
    async with Daemon(tmp_path / "j.sqlite", control) as prepaid:
        await prepaid.upsert_account(M, Settings(price=1_000_000))
        await prepaid.set_balance(M, "0", "bill-1")
        trip = f"prepaid:{M}:1:trip"
        await eventually(lambda: trip in control.commands and control.subscribers)
        control.move(trip, State.FAILED, "quiet_hours")  # the engine's guard refused it
        await eventually(lambda: prepaid.account(M)["last_action"]["result"] == "failed (quiet_hours)")
        assert [a["action"] for a in prepaid.account(M)["pending_actions"]] == ["alarm"]
        control.move(f"prepaid:{M}:1:alarm", State.VERIFIED)
        await eventually(lambda: prepaid.account(M)["pending_actions"] == [])
    async with Daemon(tmp_path / "j.sqlite", control) as prepaid:  # the fate survives a restart
        assert prepaid.account(M)["last_action"]["result"] == "failed (quiet_hours)"


async def test_a_refused_submission_is_shown_and_not_retried(tmp_path):
    control = FakeControl()
    control.error = UnknownMeter("unknown meter 000000000002")
    async with Daemon(tmp_path / "j.sqlite", control) as prepaid:
        await prepaid.upsert_account("2", Settings(price=1_000_000))
        await prepaid.set_balance("2", "5", "bill-1")
        last = prepaid.account("2")["last_action"]
        assert (last["action"], last["status"], last["detail"]) == ("alarm", "rejected", "unknown meter 000000000002")
        assert prepaid.stats["rejected"] == 1 and len(control.calls) == 1
    assert isinstance(control.error, ControlError)


async def test_an_action_past_its_validity_is_never_submitted(tmp_path):
    control = FakeControl()
    now = [time.time()]
    control.error = OSError("down")
    async with Daemon(tmp_path / "j.sqlite", control, clock=lambda: now[0]) as prepaid:
        await prepaid.upsert_account(M, Settings(price=1_000_000))
        await prepaid.set_balance(M, "10", "bill-1")
    control.error, now[0] = None, now[0] + 601  # the daemon was down longer than valid_for
    async with Daemon(tmp_path / "j.sqlite", control, clock=lambda: now[0]) as prepaid:
        await eventually(lambda: prepaid.account(M)["last_action"]["status"] == "expired")
        assert prepaid.stats["expired"] == 1 and len(control.calls) == 1


async def test_bad_input_is_refused_with_a_clear_error(tmp_path):
    control = FakeControl()
    async with Daemon(tmp_path / "j.sqlite", control) as prepaid:
        with pytest.raises(PrepaidError, match="bad address"):
            await prepaid.pay("12x", 10, "p")
        with pytest.raises(PrepaidError, match="unknown meter 000000000009"):
            await prepaid.upsert_account("9", Settings(price=1))
        await prepaid.upsert_account(M, Settings(price=1_000_000))
        with pytest.raises(PrepaidError, match="fractions of a fen"):
            await prepaid.pay(M, "1.001", "p")
        with pytest.raises(PrepaidError, match="payment_id is required"):
            await prepaid.pay(M, "1", "")
        with pytest.raises(PrepaidError, match="in the future"):
            await prepaid.set_balance(M, "1", "u", as_of=time.time() + 3600)
        prepaid.observe([energy(float("nan"), 1.0), energy(5.0, 1.0, quality=Quality.INVALID), energy("x", 1.0)])
        assert prepaid.stats["bad_readings"] == 3
        prepaid.observe([energy(5.0, 1.0, meter="000000000002")])  # no account: not ours, not an error
        assert prepaid.stats["bad_readings"] == 3 and prepaid.stats["readings"] == 0


async def test_a_long_life_keeps_a_bounded_history(tmp_path):
    control = FakeControl(State.VERIFIED)
    async with Daemon(tmp_path / "j.sqlite", control) as prepaid:
        await prepaid.upsert_account(M, Settings(price=1_000_000))
        for n in range(40):  # 40 trips and 40 restores: 160 actions
            await prepaid.set_balance(M, "-1", f"bill-{n}", as_of=time.time())
            await prepaid.pay(M, "10", f"pay-{n}")
        assert len(control.commands) == 160 and prepaid.account(M)["transitions"] == 80
        assert len(prepaid._actions[M]) == store.KEEP_ACTIONS and len(prepaid._by_request) == store.KEEP_ACTIONS
        assert prepaid.account(M)["last_action"]["request_id"] == f"prepaid:{M}:80:alarm_release"
    async with Daemon(tmp_path / "j.sqlite", control) as prepaid:
        assert len(prepaid._actions[M]) == store.KEEP_ACTIONS
