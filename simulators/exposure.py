"""How a bus is reachable from outside: the one interface every transport implements."""

from __future__ import annotations

from typing import Protocol


class Exposure(Protocol):
    """A running transport for one bus (pty, serial port, TCP server, DTU client, MQTT)."""

    kind: str  # "pty" | "serial" | "tcp" | "dtu" | "mqtt"
    where: str  # what a client needs, printed on stdout: "127.0.0.1:9000", "/dev/pts/7", a topic

    async def close(self) -> None:
        """Stop serving and release the port/socket/pty."""
