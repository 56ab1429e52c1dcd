"""sd_notify without a dependency: tell systemd we are ready, stopping, what we do; feed the watchdog.

Everything is a no-op (returns False) when `$NOTIFY_SOCKET` is not set, i.e. not under systemd.
Sends never block: a non-blocking unix datagram socket, and a full or missing socket is logged at
debug level and ignored. `watchdog()` pings from the event loop itself, so a stuck loop stops the
pings and systemd restarts the service (`WatchdogSec=` in the unit).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time

log = logging.getLogger("meterd.sdnotify")


def _address() -> str | None:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return None
    return "\0" + path[1:] if path.startswith("@") else path  # "@name": the abstract namespace


def notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1\\nSTATUS=collecting"); True when it was handed to systemd."""
    address = _address()
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.sendto(state.encode("utf-8"), address)
    except OSError as exc:  # includes BlockingIOError: never wait for systemd
        log.debug("sd_notify %r to %s failed: %s", state, os.environ.get("NOTIFY_SOCKET"), exc)
        return False
    return True


def ready(status: str | None = None) -> bool:
    """Startup is complete (links started): systemd moves the unit to active."""
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def reloading() -> bool:
    """A SIGHUP reload began; call `ready()` when it is done."""
    return notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")


def stopping() -> bool:
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """A one-line status shown by `systemctl status`."""
    return notify(f"STATUS={text}")


def watchdog_interval() -> float | None:
    """Half of `$WATCHDOG_USEC` in seconds, or None when systemd does not watch this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not os.environ.get("NOTIFY_SOCKET") or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    return value / 2e6 if value > 0 else None


async def watchdog(stop: asyncio.Event) -> None:
    """Ping `WATCHDOG=1` every half watchdog period until `stop` is set; returns at once if unwatched."""
    interval = watchdog_interval()
    if interval is None:
        return
    log.debug("watchdog: pinging every %.3f s", interval)
    while not stop.is_set():
        notify("WATCHDOG=1")
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            continue

