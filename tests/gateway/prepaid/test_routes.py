"""The account routes on a real ApiServer (127.0.0.1, a free port), the CSV import, the MQTT payment
handler and `meterd accounts` against that server (the control engine is the unit fake)."""

from __future__ import annotations

import argparse
import asyncio
import time
from zoneinfo import ZoneInfo

import aiohttp
import pytest

from gateway.api import ApiConfig, ApiServer
from gateway.control.model import ControlError
from gateway.prepaid import Settings
from gateway.prepaid.cli import add_parser
from gateway.prepaid.routes import PaymentRefused, accounts_routes, payment_handler
from gateway.stats import CollectionStats
from tests.gateway.prepaid.helpers import Daemon, FakeControl, M, energy, eventually

TOKEN = "t0ken"
M2 = "000000000002"


@pytest.fixture
async def api(tmp_path):
    control = FakeControl()
    async with Daemon(tmp_path / "j.sqlite", control) as prepaid:
        stats = CollectionStats("st-01", ZoneInfo("Asia/Shanghai"))
        server = ApiServer(ApiConfig(listen="127.0.0.1:0", token=TOKEN), stats, journal_ok=lambda: True,
                           links_up=lambda: 1)
        server.add_routes(accounts_routes(prepaid))
        await server.start()
        try:
            yield server, prepaid, control
        finally:
            await server.stop()


async def call(server, method, path, body=None, *, csv=None, token=TOKEN):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    kwargs = {"json": body} if csv is None else {"data": csv.encode(),
                                                  "headers": {**headers, "Content-Type": "text/csv"}}
    async with aiohttp.ClientSession(headers=headers) as session, \
            session.request(method, f"{server.url}/api/v1/accounts{path}", **kwargs) as resp:
        return resp.status, await resp.json()


async def test_accounts_payments_and_balances_over_http(api):
    server, prepaid, _ = api
    status, data = await call(server, "PUT", f"/{M}", {"price": "0.5", "alarm_threshold": 10})
    assert status == 200 and data["account"]["price"] == "0.50" and data["account"]["alarm_threshold"] == "10.00"
    status, data = await call(server, "POST", f"/{M}/balance", {"balance": 25, "update_id": "bill-7",
                                                               "as_of": "2024-05-01T00:00:00+08:00"})
    assert status == 201 and data["outcome"] == "applied"
    assert data["account"]["balance_as_of"] == 1714492800.0 and data["account"]["balance"] == "25.00"
    prepaid.observe([energy(100.0, time.time())])
    await eventually(lambda: prepaid.account(M)["estimated"])
    prepaid.observe([energy(140.0, time.time())])  # 40 kWh x 0.50 = 20.00 -> 5.00: alarmed
    await eventually(lambda: prepaid.account(M)["state"] == "alarmed")
    status, data = await call(server, "GET", f"/{M}")
    assert status == 200 and data["estimated_balance"] == "5.00" and data["estimated"] is True
    assert data["estimate_reading_time"] is not None and data["last_action"]["action"] == "alarm"

    status, data = await call(server, "POST", "/1/payments", {"amount": 19.99, "payment_id": "wx-1"})  # short address
    assert status == 201 and data["account"]["estimated_balance"] == "24.99"
    assert [a["action"] for a in data["actions"]] == ["alarm_release"]
    status, data = await call(server, "POST", f"/{M}/payments", {"amount": 19.99, "payment_id": "wx-1"})
    assert status == 200 and data["outcome"] == "duplicate" and data["account"]["estimated_balance"] == "24.99"
    status, data = await call(server, "GET", "")
    assert status == 200 and data["currency"] == "CNY" and [a["meter"] for a in data["accounts"]] == [M]


@pytest.mark.parametrize(("method", "path", "body", "status", "message"), [
    ("GET", "/12ab", None, 400, "bad address"),
    ("GET", f"/{M2}", None, 404, f"meter {M2} has no prepaid account"),
    ("PUT", "/000000000009", {"price": 1}, 404, "unknown meter 000000000009"),
    ("PUT", f"/{M}", {"prise": 1}, 400, "unknown field(s) 'prise'"),
    ("PUT", f"/{M}", {}, 400, "nothing to change"),
    ("PUT", f"/{M}", {"price": 1, "price_t1": 2}, 400, "either a flat price or per-tariff"),
    ("PUT", f"/{M}", {"trip_threshold": 30}, 400, "above the alarm threshold"),
    ("POST", f"/{M}/payments", {"amount": "ten", "payment_id": "p"}, 400, "amount must be a number"),
    ("POST", f"/{M}/payments", {"amount": -5, "payment_id": "p"}, 400, "amount must be more than 0"),
    ("POST", f"/{M}/payments", {"amount": 5}, 400, "payment_id is required"),
    ("POST", f"/{M2}/payments", {"amount": 5, "payment_id": "p"}, 404, "has no prepaid account"),
    ("POST", f"/{M}/balance", {"balance": 5, "update_id": "u", "as_of": "2024-05-01 00:00"}, 400, "UTC offset"),
    ("POST", f"/{M}/balance", {"update_id": "u"}, 400, "balance is required"),
])
async def test_bad_requests_say_what_is_wrong(api, method, path, body, status, message):
    server, prepaid, _ = api
    await prepaid.upsert_account(M, prepaid_settings())
    got, data = await call(server, method, path, body)
    assert got == status and message in data["error"]


def prepaid_settings():
    return Settings(price=500_000)


async def test_the_routes_need_the_token_and_json(api):
    server, _, _ = api
    status, data = await call(server, "GET", "", token=None)
    assert status == 401 and "token" in data["error"]
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as session, \
            session.post(f"{server.url}/api/v1/accounts/{M}/payments", data=b"{nope") as resp:
        assert resp.status == 400 and "JSON" in (await resp.json())["error"]


async def test_a_payment_id_reused_for_another_amount_is_a_conflict(api):
    server, prepaid, _ = api
    await prepaid.upsert_account(M, prepaid_settings())
    assert (await call(server, "POST", f"/{M}/payments", {"amount": 5, "payment_id": "p-1"}))[0] == 201
    status, data = await call(server, "POST", f"/{M}/payments", {"amount": 6, "payment_id": "p-1"})
    assert status == 409 and "already used for 5.00" in data["error"]


CSV = """address,balance,update_id,as_of,price,alarm_threshold
000000000001,100.00,bill-2024-05-1,1714492800,0.5283,
2,8.5,bill-2024-05-2,,0.60,10
"""


async def test_csv_import_applies_once_and_errors_name_the_line(api):
    server, prepaid, control = api
    status, data = await call(server, "POST", "/import", csv=CSV)
    assert status == 200 and data["imported"] == 2, data
    assert prepaid.account(M)["balance"] == "100.00" and prepaid.account(M)["price"] == "0.5283"
    assert prepaid.account(M2)["state"] == "alarmed" and control.issued() == [(M2, "alarm")]
    status, data = await call(server, "POST", "/import", csv=CSV)  # the same file again: applied once
    assert status == 200 and [line["balance"] for line in data["lines"]] == ["duplicate", "duplicate"]
    assert control.issued() == [(M2, "alarm")]

    bad = ("address,balance,update_id,price\n000000000001,50,bill-3,0.5\nxyz,1,b,1\n"
           "000000000009,1,b9,1\n2,12.345,b4,1\n2,10,,1\n")
    status, data = await call(server, "POST", "/import", csv=bad)
    assert status == 400
    assert data["errors"] == [
        "line 3: bad address: meter address must be up to 12 digits (A = wildcard), got 'xyz'",
        "line 4: unknown meter 000000000009: not in this station's meter archive",
        "line 5: balance has fractions of a fen: '12.345' (at most 2 decimals)",
        "line 6: update_id is required",
    ]
    assert prepaid.account(M)["balance"] == "100.00"  # nothing of a bad file is applied
    status, data = await call(server, "POST", "/import", csv="address,colour\n1,red\n")
    assert status == 400 and "line 1: unknown column(s) 'colour'" in data["error"]


async def test_mqtt_payments_go_through_the_same_checks(api):
    _, prepaid, control = api
    await prepaid.upsert_account(M, prepaid_settings())
    await prepaid.set_balance(M, "-3", "bill-1")
    await eventually(lambda: control.issued() == [(M, "alarm"), (M, "trip")])
    handle = payment_handler(prepaid)
    answer = await handle([M], {"amount": "10", "payment_id": "mq-1"})  # levels: what `accounts/+/payments` matched
    assert control.issued()[2:] == [(M, "close"), (M, "alarm_release")]
    assert answer["outcome"] == "applied" and answer["estimated_balance"] == "7.00" and answer["state"] == "normal"
    assert [a["action"] for a in answer["actions"]] == ["close", "alarm_release"]
    answer = await handle(["accounts", M, "payments"], {"amount": "10", "payment_id": "mq-1"})  # a redelivery
    assert answer["outcome"] == "duplicate" and len(control.calls) == 4
    for levels, payload, kind in (
            (["xyz"], {"amount": "10", "payment_id": "mq-2"}, "bad_payment"),
            ([M], {"amount": "1.001", "payment_id": "mq-3"}, "bad_payment"),
            ([M], {"amount": "1", "payment_id": "mq-1"}, "conflict"),
            ([M2], {"amount": "1", "payment_id": "mq-4"}, "unknown_account"),
            (["000000000009"], {"amount": "1", "payment_id": "mq-5"}, "unknown_meter"),
            ([M], {"amount": "1", "payment_id": "mq-6", "extra": 1}, "bad_payment")):
        with pytest.raises(PaymentRefused) as refused:
            await handle(levels, payload)
        assert isinstance(refused.value, ControlError) and refused.value.kind == kind  # the inbox rejects, counts
    assert prepaid.account(M)["estimated_balance"] == "7.00" and prepaid.stats["rejected_messages"] == 6


def meterd_accounts(server, *argv):
    parser = argparse.ArgumentParser(prog="meterd")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["accounts", *argv, "--url", server.url, "--token", TOKEN])
    return args.handler(args)


async def test_meterd_accounts_lists_pays_and_imports(api, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # a wide terminal: the table on one line per account
    server, prepaid, _ = api
    await prepaid.upsert_account(M, prepaid_settings())
    await prepaid.set_balance(M, "30", "bill-1", as_of=time.time() - 10)
    prepaid.observe([energy(10.0, time.time())])
    await eventually(lambda: prepaid.account(M)["estimated"])
    assert await asyncio.to_thread(meterd_accounts, server) == 0
    out = capsys.readouterr().out
    assert M in out and "30.00 est." in out and "normal" in out and "20.00/0.00/0.00" in out

    assert await asyncio.to_thread(meterd_accounts, server, "pay", "1", "12.50", "--payment-id", "cli-1") == 0
    assert "paid: 12.50 CNY to meter 000000000001 (payment id cli-1)" in capsys.readouterr().out
    assert await asyncio.to_thread(meterd_accounts, server, "pay", "1", "12.50", "--payment-id", "cli-1") == 0
    assert "already paid" in capsys.readouterr().out and prepaid.account(M)["estimated_balance"] == "42.50"
    assert await asyncio.to_thread(meterd_accounts, server, "pay", "1", "abc") == 1
    assert "amount must be a number" in capsys.readouterr().err

    bad = tmp_path / "bill.csv"
    bad.write_text("address,balance,update_id\n1,5,b-1\n1,x,b-2\n")
    assert await asyncio.to_thread(meterd_accounts, server, "import", str(bad)) == 1
    assert "bill.csv: line 3: balance must be a number" in capsys.readouterr().err
    bad.write_text("address,balance,update_id\n1,5,b-1\n")
    assert await asyncio.to_thread(meterd_accounts, server, "import", str(bad)) == 0
    assert "1 line(s), 1 applied" in capsys.readouterr().out

    assert await asyncio.to_thread(meterd_accounts, server, "--json") == 0
    assert '"estimated_balance"' in capsys.readouterr().out


def test_meterd_accounts_says_when_the_daemon_is_not_there(free_port, capsys):
    parser = argparse.ArgumentParser(prog="meterd")
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["accounts", "--url", f"http://127.0.0.1:{free_port}"])
    assert args.handler(args) == 1
    assert "meterd is not running at" in capsys.readouterr().err
