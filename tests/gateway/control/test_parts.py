"""The control engine's parts one by one: config, password groups, guards, the store and its event stream."""

from __future__ import annotations

import datetime as dt
import logging
import time

import pytest
from pydantic import ValidationError

from gateway.control import store
from gateway.control.config import ControlConfig, GroupAuth
from gateway.control.guards import QuietHours, TripRate
from gateway.control.ledger import Changes, Ledger
from gateway.control.model import Action, Command, Conflict, State
from gateway.control.secrets import Passwords, SecretsError, load_groups
from gateway.journal import Journal
from protocols.dlt645.requests import DEFAULT_AUTH
from tests.gateway.control.rig import TZ


def local(y: int, mo: int, d: int, h: int, mi: int = 0) -> float:
    return dt.datetime(y, mo, d, h, mi, tzinfo=TZ).timestamp()


# ---- config ----

def test_config_reads_durations_and_says_what_is_wrong():
    config = ControlConfig(default_valid_for="90s", verify_timeout="5m", max_valid_for="1h", trip_retry_every=2)
    assert (config.default_valid_for, config.verify_timeout, config.max_valid_for) == (90, 300, 3600)
    assert ControlConfig(quiet_hours="").window is None
    assert ControlConfig().window == (dt.time(20), dt.time(8))
    for bad, words in [({"quiet_hours": "8pm-8am"}, "HH:MM"), ({"quiet_hours": "20:00-20:00"}, "empty"),
                       ({"verify_timeout": "soon"}, "not a duration"), ({"retry_every": 0}, "positive"),
                       ({"hold_list": ["12AB"]}, "hold_list"), ({"quiet_mode": "maybe"}, "quiet_mode"),
                       ({"default_valid_for": "8d"}, "max_valid_for"), ({"trip_rate": 3}, "trip_rate")]:
        with pytest.raises(ValidationError, match=words):
            ControlConfig(**bad)


def test_a_password_never_shows():
    config = ControlConfig(groups={"north": GroupAuth(password="314159", operator="12345678")})
    assert "314159" not in repr(config) and "314159" not in str(config.model_dump())
    with pytest.raises(ValidationError) as err:
        GroupAuth(password="31415x")
    assert "31415x" not in str(err.value) and "6 digits" in str(err.value)
    with pytest.raises(ValidationError) as err:
        ControlConfig.model_validate({"groups": {"x": {"password": "27182", "operator": "1"}}})
    assert "27182" not in str(err.value) and "operator" in str(err.value)
    passwords = Passwords(load_groups(config))
    assert passwords.auth_for("north").password == "314159"
    assert "314159" not in repr(passwords) and "314159" not in repr(passwords.auth_for("north"))


def test_the_secrets_file_overrides_inline_values(tmp_path):
    secrets = tmp_path / "control-secrets.toml"
    secrets.write_text('[groups.north]\npassword = "271828"\n[groups.south]\npassword = "161803"\nlevel = 4\n')
    secrets.chmod(0o600)
    config = ControlConfig(groups={"north": GroupAuth(password="314159", operator="12345678")}, secrets_file=secrets)
    groups = load_groups(config)
    assert (groups["north"].password, groups["north"].operator) == ("271828", "12345678")
    assert (groups["south"].password, groups["south"].level) == ("161803", 4)


@pytest.mark.parametrize(("text", "words"), [
    ("[groups.x]\npassword = 1", "group 'x'.*password"), ("[groups.x]\nlevel = 2\n", "no password"),
    ("[other]\n", "unknown table"), ("not toml = = 1", "not valid TOML"),
])
def test_a_bad_secrets_file_names_file_and_group(tmp_path, text, words):
    secrets = tmp_path / "s.toml"
    secrets.write_text(text)
    with pytest.raises(SecretsError, match=words) as err:
        load_groups(ControlConfig(secrets_file=secrets))
    assert "s.toml" in str(err.value)
    with pytest.raises(SecretsError, match="cannot read"):
        load_groups(ControlConfig(secrets_file=tmp_path / "missing.toml"))


def test_an_unknown_group_gets_the_default_password_and_one_warning(caplog):
    passwords = Passwords({})
    with caplog.at_level(logging.WARNING):
        assert passwords.auth_for("east") is DEFAULT_AUTH
        assert passwords.auth_for("east") is DEFAULT_AUTH
        assert passwords.auth_for("") is DEFAULT_AUTH  # "default", not configured: the factory password
    assert [r.message.count("east") for r in caplog.records] == [1]


# ---- guards ----

def test_quiet_hours_wrap_midnight_and_holidays_chain():
    quiet = QuietHours((dt.time(20), dt.time(8)), [dt.date(2026, 10, 1)], TZ)
    assert quiet.quiet(local(2026, 9, 29, 21)) and quiet.quiet(local(2026, 9, 30, 7, 59))
    assert not quiet.quiet(local(2026, 9, 29, 12)) and not quiet.quiet(local(2026, 9, 29, 8))
    assert quiet.ends(local(2026, 9, 29, 12)) == local(2026, 9, 29, 12)
    assert quiet.ends(local(2026, 9, 29, 23)) == local(2026, 9, 30, 8)
    assert quiet.ends(local(2026, 9, 30, 21)) == local(2026, 10, 2, 8)  # night, holiday, night
    assert "holiday" in quiet.why(local(2026, 10, 1, 12))
    day = QuietHours((dt.time(12), dt.time(14)), [], TZ)
    assert day.quiet(local(2026, 9, 29, 13)) and not day.quiet(local(2026, 9, 29, 14))
    assert not QuietHours(None, [], TZ).enabled and not QuietHours(None, [], TZ).quiet(local(2026, 1, 1, 0))


def test_trip_rate_is_a_sliding_minute():
    rate = TripRate(30)
    assert all(rate.take(1000.0 + i) == 0.0 for i in range(30))
    assert rate.take(1030.0) == pytest.approx(30.0)  # the first slot frees at 1060
    assert rate.take(1060.0) == 0.0
    assert rate.take(1060.5) == pytest.approx(0.5)


# ---- the store and the event stream ----

def command(request_id: str, action: Action = Action.TRIP, meter: str = "000000000001", at: float = 1.0) -> Command:
    return Command(id=f"c-{request_id}", request_id=request_id, meter=meter, action=action, state=State.PENDING,
                   created=at, deadline=at + 60, updated=at)


async def test_store_submit_supersede_and_event_stream(tmp_path):
    async with Journal(tmp_path / "j.sqlite") as journal:
        await journal.write(store.create)
        await journal.write(store.create)  # idempotent
        trip = (await journal.write(store.submit, command("a"))).command
        alarm = (await journal.write(store.submit, command("b", Action.ALARM, at=2.0))).command
        done = await journal.write(store.submit, command("c", Action.CLOSE, at=3.0))
        assert [c.id for c in done.superseded] == [trip.id]
        assert (await journal.read(store.get, trip.id)).state is State.SUPERSEDED
        assert (await journal.read(store.get, alarm.id)).state is State.PENDING
        again = await journal.write(store.submit, command("a"))
        assert again.existing and again.command.state is State.SUPERSEDED
        with pytest.raises(Conflict):
            await journal.write(store.submit, command("a", Action.CLOSE))
        assert [c.id for c in await journal.read(store.open_commands)] == [alarm.id, done.command.id]
        assert [c.request_id for c in await journal.read(store.list_commands, None, 10)] == ["c", "b", "a"]
        stale = command("b", Action.ALARM, at=2.0)
        stale.state = State.SENT
        assert not await journal.write(store.transition, stale, State.SENT)  # it is pending, not sent
        events = await journal.read(store.read_events, "sink:x", 100)
        assert [(e["request_id"], e["state"]) for _, e in events] == [
            ("a", "pending"), ("b", "pending"), ("c", "pending"), ("a", "superseded")]
        assert await journal.read(store.events_backlog, "sink:x") == 4
        await journal.write(store.advance_events, "sink:x", events[1][0])
        await journal.write(store.advance_events, "sink:x", events[0][0])  # never moves back
        assert [s for s, _ in await journal.read(store.read_events, "sink:x", 100)] == [s for s, _ in events[2:]]
        assert await journal.read(store.events_backlog, "sink:x") == 2
        assert await journal.read(store.events_backlog, "sink:other") == 4

        # retention forgets the finished trip and its trail, never an open command or its events
        assert await journal.write(store.prune, 2.5) == (0, 0)  # the trip changed last at 3.0
        assert await journal.write(store.prune, 1e9) == (1, 2)
        assert await journal.read(store.get, trip.id) is None
        assert [c.id for c in await journal.read(store.open_commands)] == [alarm.id, done.command.id]
        assert {e["request_id"] for _, e in await journal.read(store.read_events, "sink:other", 100)} == {"b", "c"}


async def test_a_slow_subscriber_loses_changes_counted_never_blocks(tmp_path):
    async with Journal(tmp_path / "j.sqlite") as journal:
        await journal.write(store.create)
        ledger = Ledger(journal, time.time)
        slow = Changes(ledger, size=2)
        async with ledger.subscribe() as fast:
            for n in range(4):
                c = command(f"r{n}", Action.ALARM, meter=f"00000000000{n}")
                await journal.write(store.submit, c)
                ledger.record(c)
            assert [(await anext(fast)).request_id for _ in range(4)] == ["r0", "r1", "r2", "r3"]
        assert slow.dropped == 2 and ledger.counters["changes_dropped"] == 2
        assert [(await anext(slow)).request_id for _ in range(2)] == ["r0", "r1"]
        assert fast not in ledger.subscribers and slow in ledger.subscribers
        slow.close()
        assert not ledger.subscribers
