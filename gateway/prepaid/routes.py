"""HTTP routes for accounts on the daemon's ApiServer, and the MQTT payment handler.

GET  /api/v1/accounts                        every account, with balance and estimate
GET  /api/v1/accounts/{address}              one account
PUT  /api/v1/accounts/{address}              settings: price or price_t1..t4 / tariff_prices, thresholds
POST /api/v1/accounts/{address}/payments     {amount, payment_id}
POST /api/v1/accounts/{address}/balance      {balance, update_id, as_of}
POST /api/v1/accounts/import                 text/csv (see csvimport.py)
Every refusal is a 4xx with {"error": "..."} saying what is wrong.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

from aiohttp import web

from gateway.api import ApiError, reply
from gateway.control.model import ControlError
from gateway.prepaid import csvimport
from gateway.prepaid.forms import SETTING_FIELDS, parse_time, settings_or_empty, text, unknown
from gateway.prepaid.money import PrepaidError, UnknownAccount
from gateway.prepaid.policy import Prepaid

log = logging.getLogger("meterd.prepaid")
MAX_CSV = 32 * 1024 * 1024  # bytes: a big station's whole export
View = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _refusals(fn: View) -> View:
    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            return await fn(request)
        except PrepaidError as exc:
            raise ApiError(exc.status, str(exc)) from None
    return guarded


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json(loads=lambda raw: json.loads(raw, parse_float=Decimal))  # amounts stay exact
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the body must be a JSON object: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body


async def _csv(request: web.Request) -> str:
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(65536):
        size += len(chunk)
        if size > MAX_CSV:
            raise ApiError(413, f"the CSV is bigger than {MAX_CSV // 1024 // 1024} MiB; split it")
        chunks.append(chunk)
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the CSV must be UTF-8: {exc}") from None


def accounts_routes(prepaid: Prepaid) -> list[web.RouteDef]:
    """The account routes, for `ApiServer.add_routes()`."""

    async def list_accounts(request: web.Request) -> web.StreamResponse:
        return reply({"currency": prepaid.config.currency, "accounts": prepaid.accounts()})

    async def get_account(request: web.Request) -> web.StreamResponse:
        return reply(prepaid.account(request.match_info["address"]))

    async def put_account(request: web.Request) -> web.StreamResponse:
        body = await _json(request)
        unknown(body, SETTING_FIELDS)
        result = await prepaid.upsert_account(request.match_info["address"], settings_or_empty(body))
        return reply(result)

    async def pay(request: web.Request) -> web.StreamResponse:
        body = await _json(request)
        unknown(body, ("amount", "payment_id"))
        if "amount" not in body:
            raise PrepaidError("amount is required")
        result = await prepaid.pay(request.match_info["address"], body["amount"], text(body, "payment_id"))
        return reply(result, 201 if result["outcome"] == "applied" else 200)

    async def balance(request: web.Request) -> web.StreamResponse:
        body = await _json(request)
        unknown(body, ("balance", "update_id", "as_of"))
        if "balance" not in body:
            raise PrepaidError("balance is required")
        result = await prepaid.set_balance(request.match_info["address"], body["balance"], text(body, "update_id"),
                                           parse_time(body.get("as_of")))
        return reply(result, 201 if result["outcome"] == "applied" else 200)

    async def import_csv(request: web.Request) -> web.StreamResponse:
        try:
            rows = csvimport.parse(await _csv(request), prepaid)
        except csvimport.BadImport as exc:
            return reply({"error": str(exc), "errors": exc.errors}, 400)
        results, errors = await csvimport.apply(rows, prepaid)
        data = {"imported": len(rows) - len(errors), "lines": results, "errors": errors}
        if errors:
            data["error"] = f"{len(errors)} line(s) not applied: " + "; ".join(errors[:10])
        return reply(data, 422 if errors else 200)

    base = "/api/v1/accounts"
    return [
        web.get(base, _refusals(list_accounts)),
        web.post(f"{base}/import", _refusals(import_csv)),
        web.get(f"{base}/{{address}}", _refusals(get_account)),
        web.put(f"{base}/{{address}}", _refusals(put_account)),
        web.post(f"{base}/{{address}}/payments", _refusals(pay)),
        web.post(f"{base}/{{address}}/balance", _refusals(balance)),
    ]


class PaymentRefused(ControlError):
    """A payment message that cannot be used. gateway.control's inbox answers it on `<topic>/rejected`
    and counts it under `kind` (bad_payment, unknown_account, unknown_meter, conflict)."""

    def __init__(self, message: str, kind: str, status: int = 400) -> None:
        super().__init__(message)
        self.kind, self.status = kind, status


def payment_handler(prepaid: Prepaid) -> Callable[[list[str], dict[str, Any]], Awaitable[dict[str, Any]]]:
    """For the MQTT inbox: `Inbox.route("accounts/+/payments", payment_handler(prepaid))`.

    `levels` are what the route's `+` matched (`[address]`); the whole relative topic
    (`["accounts", address, "payments"]`) works too. The payload is {amount, payment_id}; a
    redelivered message with the same payment_id counts once. A bad message raises PaymentRefused
    (also counted in stats["rejected_messages"]); a journal failure propagates, so the message is
    not acknowledged and comes again. The answer (for `<topic>/accepted`) says what happened.
    """

    async def handle(levels: list[str], payload: dict[str, Any]) -> dict[str, Any]:
        try:
            if len(levels) == 3 and levels[0] == "accounts" and levels[2] == "payments":
                levels = levels[1:2]
            if len(levels) != 1:
                raise PrepaidError(f"not a payment topic: {'/'.join(levels)} (accounts/<address>/payments)")
            if not isinstance(payload, dict):
                raise PrepaidError("the payload must be a JSON object {amount, payment_id}")
            unknown(payload, ("amount", "payment_id"))
            if "amount" not in payload:
                raise PrepaidError("amount is required")
            result = await prepaid.pay(levels[0], payload["amount"], text(payload, "payment_id"), source="mqtt")
        except PrepaidError as exc:
            prepaid.stats["rejected_messages"] += 1
            kind = {400: "bad_payment", 409: "conflict"}.get(exc.status) or \
                ("unknown_account" if isinstance(exc, UnknownAccount) else "unknown_meter")
            raise PaymentRefused(str(exc), kind, exc.status) from None
        account = result["account"]
        log.info("prepaid: MQTT payment %s for meter %s: %s", payload["payment_id"], account["meter"],
                 result["outcome"])
        return {"payment_id": str(payload["payment_id"]), "meter": account["meter"], "outcome": result["outcome"],
                "estimated_balance": account["estimated_balance"], "state": account["state"],
                "actions": [{"action": a["action"], "command_id": a["command_id"]} for a in result["actions"]]}

    return handle
