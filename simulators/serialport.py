"""A bus on a real serial port (an RS-485 adapter wired to the gateway's), via pyserial-asyncio-fast.

On a real serial line the request bytes are already paced by the wire, so
the fleet should give such a bus `Wire(request_on_wire=False)`; otherwise
the request's transmit time is counted twice. (Over a pty used as a
"serial device" requests arrive at once, and the default is right.)

The `link_drop` fault closes the port; it is opened again after
`reopen_after` seconds. If the device goes away (USB adapter unplugged),
opening is retried every `reopen_after` seconds until it is back.

A pty used as the device has no parity bit: Linux's pty driver clears
PARENB, and glibc's `tcsetattr` then reports EINVAL because the setting did
not stick (pyserial-asyncio-fast re-applies the settings when it sets its
timeouts, so opening a pty with parity E fails). On a pty, parity is
therefore always "N".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import termios

import serial
import serial_asyncio_fast

from simulators.bus import Bus, Connection, StreamPort

log = logging.getLogger(__name__)

PTY_SLAVE_MAJORS = range(136, 144)  # Linux Unix98 pty slaves (/dev/pts/N)


def is_pty(device: str) -> bool:
    try:
        st = os.stat(device)
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) in PTY_SLAVE_MAJORS


class _SerialPort(StreamPort):
    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.transport: asyncio.Transport | None = None
        self.conn: Connection | None = None
        self.lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn = self.bus.attach(self)

    def data_received(self, data: bytes) -> None:
        if self.conn is not None:
            self.conn.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if not self.lost.done():
            self.lost.set_result(exc)


class SerialExposure:
    kind = "serial"

    def __init__(self, bus: Bus, device: str, settings: dict[str, object], reopen_after: float) -> None:
        self.bus = bus
        self.device = device
        self.where = device
        self.settings = settings
        self.reopen_after = reopen_after
        self.port: _SerialPort | None = None
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> _SerialPort:
        loop = asyncio.get_running_loop()
        _, port = await serial_asyncio_fast.create_serial_connection(
            loop, lambda: _SerialPort(self.bus), self.device, **self.settings)
        assert isinstance(port, _SerialPort)
        self.port = port
        self.bus.truth["serial_opens"] += 1
        return port

    def start(self, port: _SerialPort) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(port), name=f"serial-{self.bus.name}")

    async def _run(self, port: _SerialPort) -> None:
        while True:
            exc = await asyncio.shield(port.lost)  # a cancelled wait must not cancel the future
            self.port = None
            self.bus.truth["serial_closes"] += 1
            log.info("serial %s closed (%s); reopening in %.2f s", self.device, exc or "dropped", self.reopen_after)
            while True:
                await asyncio.sleep(self.reopen_after)
                try:
                    port = await self.open()
                    break
                except (OSError, serial.SerialException, termios.error) as error:
                    self.bus.truth["serial_open_failures"] += 1
                    log.debug("serial %s: cannot open (%s)", self.device, error)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        port, self.port = self.port, None
        if port is not None and port.transport is not None:
            port.transport.abort()  # no flush: tcdrain could wait for a reader that is gone
            await port.lost  # the transport closes the device in the background; wait for it


async def serve_serial(bus: Bus, device: str, *, baud: int = 2400, parity: str = "E", bytesize: int = 8,
                       stopbits: float = 1, reopen_after: float = 1.0) -> SerialExposure:
    """Serve the bus on `device` (8E1 at 2400 baud by default, DL/T 645's usual settings).

    Raises `serial.SerialException` (or OSError) if the device cannot be opened
    now; later losses are retried. Give a real serial port's bus
    `Wire(request_on_wire=False)` (see the module docstring). Counts
    `serial_opens`, `serial_closes` and `serial_open_failures` in `bus.truth`.
    """
    if reopen_after <= 0:
        raise ValueError(f"reopen_after must be > 0, got {reopen_after}")
    if parity != "N" and is_pty(device):
        log.info("serial %s is a pty: parity %s does not apply, using N", device, parity)
        parity = "N"
    settings: dict[str, object] = {"baudrate": baud, "parity": parity, "bytesize": bytesize, "stopbits": stopbits}
    exposure = SerialExposure(bus, device, settings, reopen_after)
    exposure.start(await exposure.open())
    return exposure
