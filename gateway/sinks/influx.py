"""The InfluxDB sink: line protocol over `/write` (v1, plain aiohttp) or `/api/v2/write`.

`api = "v2"` uses influxdb-client's asyncio client (`InfluxDBClientAsync` +
`WriteApiAsync`: one request per call, no batching thread, no retries of its own) and works
with InfluxDB 1.8+ (bucket `db/rp`, token `user:password`), 2.x, 3.x and VictoriaMetrics.
`api = "v1"` posts to `/write?db=&rp=&precision=s` for 1.x servers older than 1.8.
Both send gzip bodies and precision seconds; the run loop, batching and error handling are
`Sink`'s (base.py).
"""

from __future__ import annotations

import base64
import gzip
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import aiohttp
from influxdb_client.client.influxdb_client_async import InfluxDBClientAsync
from influxdb_client.client.write_api_async import WriteApiAsync
from influxdb_client.domain.write_precision import WritePrecision
from influxdb_client.rest import ApiException
from pydantic import Field, SecretStr, field_validator, model_validator

from gateway.model import Reading, RoundStats
from gateway.sinks.base import Rows, Sink, SinkSettings, WriteFailure, parse_retry_after
from gateway.sinks.control import control_line, encode_each
from gateway.sinks.lineproto import reading_lines, round_lines, row_lines

log = logging.getLogger(__name__)

_V1_ONLY = ("database", "retention_policy", "username", "password")
_V2_ONLY = ("org", "bucket", "token", "token_file")


class InfluxSinkConfig(SinkSettings):
    """`[[sinks]] kind = "influxdb"`."""

    kind: Literal["influxdb"] = "influxdb"
    api: Literal["v1", "v2"] = "v2"
    url: str = Field(pattern=r"^https?://[^/\s]+(/\S*)?$")
    # v1 (/write)
    database: str | None = None
    retention_policy: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    # v2 (/api/v2/write)
    org: str | None = None
    bucket: str | None = None
    token: SecretStr | None = None
    token_file: Path | None = None
    timeout: float = Field(default=10.0, gt=0)
    gzip: bool = True

    @field_validator("url")
    @classmethod
    def _no_trailing_slash(cls, url: str) -> str:
        return url.rstrip("/")

    @model_validator(mode="after")
    def _fits_api(self) -> InfluxSinkConfig:
        wrong = _V2_ONLY if self.api == "v1" else _V1_ONLY
        given = [key for key in wrong if getattr(self, key) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} not used with api = {self.api!r}")
        if self.api == "v1" and not self.database:
            raise ValueError("api = 'v1' needs database")
        if self.api == "v2" and not self.bucket:
            raise ValueError("api = 'v2' needs bucket")
        if self.token is not None and self.token_file is not None:
            raise ValueError("give token or token_file, not both")
        if (self.username is None) != (self.password is None):
            raise ValueError("username and password go together")
        return self

    def read_token(self) -> str:
        """The v2 token: from `token`, else the first line of `token_file` (re-read on 401)."""
        if self.token is not None:
            return self.token.get_secret_value()
        if self.token_file is not None:
            # A few bytes, read at start and after a 401: not worth the writer thread.
            lines = self.token_file.read_text(encoding="utf-8").strip().splitlines()
            return lines[0].strip() if lines else ""
        return ""


class InfluxSink(Sink[str]):
    """Readings -> line protocol -> InfluxDB (or VictoriaMetrics)."""

    def __init__(self, config: InfluxSinkConfig, station: str = "") -> None:
        """`station`: the daemon's, the `station` tag of control events."""
        super().__init__(config)
        self.config = config
        self.station = station
        self._session: aiohttp.ClientSession | None = None
        self._client: InfluxDBClientAsync | None = None
        self._write_api: WriteApiAsync | None = None

    def encode_readings(self, readings: list[Reading]) -> list[str]:
        return reading_lines(readings)

    def row_encoder(self) -> Callable[[Rows], list[str]]:
        return row_lines

    def encode_rounds(self, rounds: list[RoundStats]) -> list[str]:
        return round_lines(rounds)

    def encode_events(self, events: list[dict[str, Any]]) -> list[str]:
        return encode_each(events, lambda event: control_line(event, self.station), self.name)

    async def open(self) -> None:
        if self.config.api == "v1":
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.config.timeout))
        else:
            self._open_v2()

    def _open_v2(self) -> None:
        try:
            token = self.config.read_token()
        except OSError as exc:
            token = ""
            self.set_failing(f"token_file: {exc}", "unauthorized")
        self._client = InfluxDBClientAsync(
            url=self.config.url, token=token, org=self.config.org or "-",
            timeout=int(self.config.timeout * 1000), enable_gzip=self.config.gzip)
        self._write_api = self._client.write_api()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._client is not None:
            await self._client.close()  # type: ignore[no-untyped-call]
            self._client = self._write_api = None

    async def reauthorize(self) -> None:
        if self.config.api == "v2" and self.config.token_file is not None:
            await self.close()
            self._open_v2()

    async def send(self, units: list[str]) -> None:
        if self.config.api == "v1":
            await self._send_v1(units)
        else:
            await self._send_v2(units)

    async def _send_v1(self, lines: list[str]) -> None:
        assert self._session is not None, "send() before open()"
        params = {"db": self.config.database or "", "precision": "s"}
        if self.config.retention_policy:
            params["rp"] = self.config.retention_policy
        body = "\n".join(lines).encode()
        headers = {"Content-Type": "text/plain; charset=utf-8"}
        if self.config.gzip:
            body = gzip.compress(body, compresslevel=1)  # ~1 ms per 5000 lines; level 9 saves 5 %
            headers["Content-Encoding"] = "gzip"
        if self.config.username is not None and self.config.password is not None:
            pair = f"{self.config.username}:{self.config.password.get_secret_value()}"
            headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
        try:
            async with self._session.post(f"{self.config.url}/write", params=params, data=body,
                                          headers=headers) as response:
                if 200 <= response.status < 300:
                    return
                text = (await response.text(errors="replace")).strip()
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise WriteFailure(f"{self.config.url}: {type(exc).__name__}: {exc}") from exc
        raise WriteFailure(f"HTTP {status}: {text[:300]}", status, retry_after)

    async def _send_v2(self, lines: list[str]) -> None:
        assert self._write_api is not None, "send() before open()"
        try:
            await self._write_api.write(bucket=self.config.bucket or "", org=self.config.org or "-",
                                        record=lines,
                                        write_precision=WritePrecision.S)  # type: ignore[arg-type]  # a str constant
        except ApiException as exc:  # any non-2xx answer; status 0 = request not even built
            status = int(exc.status) if exc.status else None
            message = str(getattr(exc, "message", "") or exc.reason or "").strip()
            raise WriteFailure(f"HTTP {exc.status}: {message[:300]}", status,
                               parse_retry_after(getattr(exc, "retry_after", None))) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:  # no answer: refused, reset, timed out
            raise WriteFailure(f"{self.config.url}: {type(exc).__name__}: {exc}") from exc
