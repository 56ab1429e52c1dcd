"""Account operations against the real journal: idempotency keys, references, estimates, persistence."""

from __future__ import annotations

import asyncio
import itertools
from decimal import ROUND_HALF_UP, Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.journal import Journal, JournalConfig
from gateway.prepaid import ledger, store
from gateway.prepaid.account import Standing, estimate
from gateway.prepaid.config import TARIFFS, TOTAL, PrepaidConfig
from gateway.prepaid.money import Conflict, UnknownAccount

FAST = JournalConfig(commit_interval=0.0)
RULES = ledger.Rules.of(PrepaidConfig(enabled=True))
M = "000000000001"


@pytest.fixture
async def journal(tmp_path):
    async with Journal(tmp_path / "journal.sqlite", FAST) as j:
        await j.write(store.create)
        yield j


async def account(journal, meter=M, **settings):
    return await journal.write(ledger.upsert, meter, ledger.Settings(**settings), RULES, 100.0)


async def pay(journal, amount, payment_id, meter=M, now=200.0):
    return await journal.write(ledger.pay, ledger.Payment(meter, amount, payment_id), RULES, now)


async def update(journal, balance, as_of, update_id, found=None, meter=M, now=300.0):
    return await journal.write(ledger.update, ledger.Update(meter, balance, as_of, update_id, found or {}), RULES, now)


async def registers(journal, meter=M, now=400.0, **regs):
    return await journal.write(ledger.registers, {meter: regs}, RULES, now)


def balance(result):
    return estimate(result.account, TOTAL, TARIFFS).balance


async def test_a_payment_applies_once_per_payment_id(journal):
    await account(journal, price=500_000)
    assert balance(await pay(journal, 5000, "p-1")) == 5000
    again = await pay(journal, 5000, "p-1")
    assert again.outcome == "duplicate" and balance(again) == 5000
    with pytest.raises(Conflict, match=r"already used for 50\.00 to meter 000000000001"):
        await pay(journal, 7000, "p-1")
    assert balance(await pay(journal, 1000, "p-2")) == 6000
    with pytest.raises(UnknownAccount, match="000000000002 has no prepaid account"):
        await pay(journal, 1000, "p-3", meter="000000000002")
    assert await journal.read(store.find_payment, "p-3") is None  # a refused payment leaves nothing behind


async def test_the_first_reading_after_a_balance_update_is_the_reference(journal):
    await account(journal, price=1_000_000)  # 1.00 per kWh
    await registers(journal, **{TOTAL: (100_000, 50.0)})  # before the balance's as-of time: not a reference
    r = await update(journal, 10_000, 60.0, "u-1")
    assert r.account.ref == {} and balance(r) == 10_000
    r = await registers(journal, **{TOTAL: (101_000, 70.0)})
    assert r[0].account.ref == {TOTAL: (101_000, 70.0)} and balance(r[0]) == 10_000
    r = await registers(journal, **{TOTAL: (103_500, 80.0)})  # 2.5 kWh later
    assert balance(r[0]) == 10_000 - 250
    r = await registers(journal, **{TOTAL: (102_000, 75.0)})  # older than the newest: ignored
    assert balance(r[0]) == 10_000 - 250 and r[0].account.latest[TOTAL] == (103_500, 80.0)


async def test_balance_updates_are_idempotent_and_never_go_back_in_time(journal):
    await account(journal, price=1_000_000)
    found = {TOTAL: (200_000, 1000.0)}
    r = await update(journal, 5000, 1000.0, "u-1", found)
    assert r.account.ref == found and r.account.latest == found
    assert (await update(journal, 5000, 1000.0, "u-1", found)).outcome == "duplicate"
    assert (await update(journal, 5000, 1001.0, "u-1", found)).outcome == "duplicate"  # a retry, as_of defaulted
    with pytest.raises(Conflict, match="update_id 'u-1' was already used"):
        await update(journal, 6000, 1000.0, "u-1")
    stale = await update(journal, 9000, 900.0, "u-0")
    assert stale.outcome == "stale" and stale.account.balance == 5000
    assert await journal.read(store.find_update, "u-0") == (M, 9000, 900.0, False)  # kept, marked not applied


async def test_payments_after_the_billing_time_are_added_to_its_balance(journal):
    await account(journal)
    await pay(journal, 3000, "p-early", now=100.0)
    await pay(journal, 2000, "p-late", now=500.0)
    r = await update(journal, 10_000, 400.0, "u-1", now=600.0)  # billing knew p-early, not p-late yet
    assert r.account.balance == 12_000


async def test_a_register_that_goes_back_restarts_the_estimate_without_losing_it(journal):
    await account(journal, price=1_000_000)
    await update(journal, 10_000, 0.0, "u-1", {TOTAL: (500_000, 1.0)})
    await registers(journal, **{TOTAL: (501_000, 2.0)})  # 1 kWh = 1.00
    r = (await registers(journal, **{TOTAL: (2_000, 3.0)}))[0]  # a replaced meter
    assert r.register_back == 1 and balance(r) == 9900
    r = (await registers(journal, **{TOTAL: (4_000, 4.0)}))[0]  # 2 kWh on the new meter
    assert balance(r) == 9700


async def test_a_price_change_keeps_the_energy_used_so_far_at_the_old_price(journal):
    await account(journal, price=1_000_000)
    await update(journal, 10_000, 0.0, "u-1", {TOTAL: (0, 1.0)})
    await registers(journal, **{TOTAL: (1_000, 2.0)})  # 1 kWh at 1.00
    r = await account(journal, tariff_prices={1: 2_000_000, 2: 500_000})
    assert r.account.price is None and balance(r) == 9900
    r = (await registers(journal, **{TARIFFS[0]: (10_000, 3.0), TARIFFS[1]: (20_000, 3.0)}))[0]
    assert balance(r) == 9900  # the tariff registers' first reading is their reference
    r = (await registers(journal, **{TARIFFS[0]: (11_000, 4.0), TARIFFS[1]: (22_000, 4.0)}))[0]
    assert balance(r) == 9900 - 200 - 100


async def test_thresholds_are_checked_and_transitions_persist(tmp_path):
    path = tmp_path / "journal.sqlite"
    async with Journal(path, FAST) as j:
        await j.write(store.create)
        with pytest.raises(ValueError, match="above the restore threshold"):
            await account(j, trip=1000)
        await account(j, price=1_000_000, alarm=3000)
        r = await update(j, 2500, 0.0, "u-1")
        assert r.account.state is Standing.ALARMED and [a.action for a in r.actions] == ["alarm"]
        assert r.actions[0].request_id == f"prepaid:{M}:1:alarm"
    async with Journal(path, FAST) as j:  # reopened: the account and its decision are there
        accounts, actions = await j.read(store.all_accounts), await j.read(store.all_actions)
        assert [(a.meter, a.state, a.seq, a.balance, a.alarm) for a in accounts] == [
            (M, Standing.ALARMED, 1, 2500, 3000)]
        assert [(a.request_id, a.status) for a in actions] == [(f"prepaid:{M}:1:alarm", "pending")]
        types = await j.read(lambda c: c.execute("SELECT typeof(balance), typeof(price), typeof(alarm), "
                                                  "typeof(last_estimate) FROM prepaid_accounts").fetchone())
        assert types == ("integer", "integer", "integer", "integer")  # money is never a float in the database


async def test_a_restore_supersedes_a_trip_that_was_not_submitted_yet(journal):
    await account(journal, price=1_000_000)
    r = await update(journal, 0, 0.0, "u-1")
    assert [a.action for a in r.actions] == ["alarm", "trip"]
    r = await pay(journal, 5000, "p-1")
    assert [a.action for a in r.actions] == ["close", "alarm_release"]
    assert sorted(r.superseded) == [f"prepaid:{M}:1:alarm", f"prepaid:{M}:1:trip"]
    statuses = {a.request_id: a.status for a in await journal.read(store.all_actions)}
    assert statuses[f"prepaid:{M}:1:trip"] == "superseded" and statuses[f"prepaid:{M}:2:close"] == "pending"


async def test_disabled_policy_keeps_balances_but_decides_nothing(journal):
    rules = ledger.Rules.of(PrepaidConfig(enabled=False))
    await journal.write(ledger.upsert, M, ledger.Settings(price=1_000_000), rules, 1.0)
    r = await journal.write(ledger.update, ledger.Update(M, -500, 0.0, "u-1", {}), rules, 2.0)
    assert r.actions == [] and r.account.state is Standing.NORMAL and r.account.balance == -500


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(price=st.integers(min_value=1, max_value=5_000_000),
       events=st.lists(st.one_of(st.tuples(st.just("pay"), st.integers(min_value=1, max_value=10**6)),
                                 st.tuples(st.just("read"), st.integers(min_value=0, max_value=50_000))),
                       min_size=1, max_size=30))
def test_payments_and_readings_through_the_journal_never_drift(tmp_path, price, events):
    """Whatever the order of payments and polls, the stored balance equals the closed form."""
    async def scenario():
        async with Journal(tmp_path / f"j{next(COUNT)}.sqlite", FAST) as j:
            await j.write(store.create)
            await j.write(ledger.upsert, M, ledger.Settings(price=price), RULES, 1.0)
            await j.write(ledger.update, ledger.Update(M, 0, 1.0, "u", {TOTAL: (0, 1.0)}), RULES, 1.0)
            register, paid, t = 0, 0, 1.0
            for kind, n in events:
                t += 1
                if kind == "pay":
                    paid += n
                    await j.write(ledger.pay, ledger.Payment(M, n, f"p{t}"), RULES, t)
                else:
                    register += n
                    await j.write(ledger.registers, {M: {TOTAL: (register, t)}}, RULES, t)
            a = await j.read(store.get_account, M)
            cost = (Decimal(register) * price / 10**7).quantize(Decimal(1), rounding=ROUND_HALF_UP)
            assert estimate(a, TOTAL, TARIFFS).balance == paid - int(cost)
    asyncio.run(scenario())


COUNT = itertools.count()


async def fate(journal, request_id, status, result=""):
    action = next(a for a in await journal.read(store.all_actions) if a.request_id == request_id)
    action.status, action.result = status, result
    await journal.write(ledger.record_action, action)


async def test_a_relay_command_that_did_not_get_through_goes_again_when_the_meter_is_heard(journal):
    await account(journal, price=1_000_000)
    await update(journal, 0, 0.0, "u-1", {TOTAL: (0, 1.0)}, now=1000.0)  # alarm + trip (seq 1)
    await fate(journal, f"prepaid:{M}:1:trip", "submitted", "failed (quiet_hours)")
    r = (await registers(journal, now=1000.0 + RULES.retry_after - 1, **{TOTAL: (10, 2.0)}))[0]
    assert r.actions == []  # not before retry_after
    r = (await registers(journal, now=1000.0 + RULES.retry_after, **{TOTAL: (20, 3.0)}))[0]
    assert [(a.request_id, a.reason) for a in r.actions] == [
        (f"prepaid:{M}:2:trip", "again: the last trip ended failed (quiet_hours)")]
    await fate(journal, f"prepaid:{M}:2:trip", "submitted", "failed (hold)")  # the hold list: never again
    r = (await registers(journal, now=10_000.0, **{TOTAL: (30, 4.0)}))[0]
    assert r.actions == [] and r.account.state is Standing.TRIPPED

    r = await pay(journal, 5000, "p-1", now=10_001.0)  # restore (seq 3) ...
    await fate(journal, f"prepaid:{M}:3:close", "submitted", "expired (the meter was offline)")  # ... never got there
    r = (await registers(journal, now=20_000.0, **{TOTAL: (40, 5.0)}))[0]  # the meter answers again
    assert [a.action for a in r.actions] == ["close"] and r.actions[0].seq == 4
    await fate(journal, f"prepaid:{M}:4:close", "submitted", "verified")
    r = (await registers(journal, now=30_000.0, **{TOTAL: (50, 6.0)}))[0]
    assert r.actions == []
