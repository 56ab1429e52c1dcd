"""A serial port (RS-485 adapter) as a link, via pyserial-asyncio-fast.

The port is opened exclusively (one master per bus) and its input is
flushed on every open. When the device goes away (USB adapter unplugged, a
pty hanging up: EIO) the link goes down and the same path is opened again
with backoff; the path may be a symlink that is re-created later.

A pty has no parity bit: Linux's pty driver clears PARENB, so configuring
parity E fails with EINVAL. On a pty the port is therefore opened with
parity N, and that is logged once.
"""

from __future__ import annotations

import asyncio
import os
import stat
from typing import Any, ClassVar

import serial_asyncio_fast

from gateway.links.base import RECONNECT_MAX, RECONNECT_MIN, log
from gateway.links.tcp import ByteLink, StreamProtocol

PARITIES = ("N", "E", "O", "M", "S")
BYTESIZES = (5, 6, 7, 8)
STOPBITS = (1, 1.5, 2)
PTY_SLAVE_MAJORS = range(136, 144)  # Linux Unix98 pty slaves (/dev/pts/N)


def is_pty(device: str) -> bool:
    """True when `device` (or what a symlink there points at) is a pseudo-terminal slave."""
    if os.path.realpath(device).startswith("/dev/pts/"):
        return True
    try:
        st = os.stat(device)
    except OSError:
        return False
    return stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) in PTY_SLAVE_MAJORS


class SerialLink(ByteLink):
    kind: ClassVar[str] = "serial"
    connection_errors: ClassVar[tuple[type[BaseException], ...]] = (OSError, EOFError, ValueError)

    def __init__(self, name: str, port: str, *, baud: int = 2400, parity: str = "E", bytesize: int = 8,
                 stopbits: float = 1, reconnect_min: float = RECONNECT_MIN,
                 reconnect_max: float = RECONNECT_MAX) -> None:
        if parity not in PARITIES:
            raise ValueError(f"parity must be one of {', '.join(PARITIES)}, got {parity!r}")
        if bytesize not in BYTESIZES:
            raise ValueError(f"bytesize must be one of {BYTESIZES}, got {bytesize!r}")
        if stopbits not in STOPBITS:
            raise ValueError(f"stopbits must be one of {STOPBITS}, got {stopbits!r}")
        if baud <= 0:
            raise ValueError(f"baud must be > 0, got {baud}")
        super().__init__(name, reconnect_min=reconnect_min, reconnect_max=reconnect_max)
        self.port = port
        self.baud = baud
        self.parity = parity
        self.bytesize = bytesize
        self.stopbits = stopbits
        self._pty_noted = False

    def tx_time(self, size: int) -> float:
        bits = 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits
        return size * bits / self.baud

    def _close(self, transport: asyncio.Transport) -> None:
        transport.abort()  # close() would drain output first, which never ends on a pty nobody reads

    def describe_loss(self, exc: BaseException) -> str:
        text = str(exc)
        if "returned no data" in text or "Errno 5" in text:  # pyserial's words for EOF / EIO on read
            return "the device hung up (unplugged, or the pty was closed)"
        return super().describe_loss(exc)

    def _settings(self) -> dict[str, Any]:
        parity = self.parity
        if parity != "N" and is_pty(self.port):
            parity = "N"
            if not self._pty_noted:
                self._pty_noted = True
                log.info("serial %s: %s is a pty, which cannot hold parity %s: using parity N",
                         self.name, self.port, self.parity)
        return {"baudrate": self.baud, "parity": parity, "bytesize": self.bytesize, "stopbits": self.stopbits}

    async def _open(self) -> tuple[asyncio.Transport, StreamProtocol, str]:
        settings = self._settings()
        loop = asyncio.get_running_loop()
        protocol = StreamProtocol(self)
        transport, _ = await serial_asyncio_fast.create_serial_connection(
            loop, lambda: protocol, self.port, exclusive=True, **settings)
        device = transport.serial
        if device is not None:
            device.reset_input_buffer()  # whatever waited in the port belongs to nobody
        real = os.path.realpath(self.port)
        where = self.port if real == self.port else f"{self.port} ({real})"
        frame = f"{settings['bytesize']}{settings['parity']}{settings['stopbits']:g}"
        return transport, protocol, f"{where} {self.baud} {frame}"
