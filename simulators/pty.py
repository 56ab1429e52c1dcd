"""A bus behind a pseudo-terminal: the client opens the slave (or a stable symlink to it) like a serial port.

The slave is put in raw mode, so binary frames pass without echo or line
discipline. We keep our own descriptor of the slave open: without it the
master reports hang-up (EIO, always readable) whenever no client has the
slave open, and a reader callback would spin. A client may therefore close
and reopen the slave at will. One consequence: reply bytes a client did not
read before closing wait in the slave's input queue for the next client
(as on a real serial port; clients flush input on open).

The `link_drop` fault hangs up: the master is closed (the client reads EOF,
its writes fail with EIO), the symlink disappears, and after `reopen_after`
seconds a new pty is opened and the link points at it. The kernel may give
the new pty the same /dev/pts number.

Requests arrive on a pty at once, so the bus should emulate their wire time
(`Wire.request_on_wire = True`, the default).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import termios
import tty

from simulators.bus import Bus, Connection

log = logging.getLogger(__name__)

READ_SIZE = 4096
EIO_PAUSE = 0.1  # s to stop reading after an unexpected EIO, instead of spinning on it


class _Pty:
    """One master/slave pair; the bus's Port while it is open."""

    def __init__(self, exposure: PtyExposure) -> None:
        self.exposure = exposure
        self.loop = asyncio.get_running_loop()
        self.master, self.slave = os.openpty()
        try:
            tty.setraw(self.slave)
            os.set_blocking(self.master, False)
            self.path = os.ttyname(self.slave)
        except (OSError, termios.error) as exc:
            os.close(self.master)
            os.close(self.slave)
            raise OSError(f"cannot set up a pty: {exc}") from exc
        self.loop.add_reader(self.master, self._readable)
        self.conn: Connection | None = exposure.bus.attach(self)

    @property
    def is_open(self) -> bool:
        return self.master >= 0

    def _readable(self) -> None:
        try:
            data = os.read(self.master, READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno != errno.EIO:
                log.warning("pty %s: read failed (%s); hanging up", self.path, exc)
                self.exposure.bus.truth["pty_errors"] += 1
                self.exposure.hang_up(self)
                return
            self.exposure.bus.truth["pty_eio"] += 1  # no slave open: wait, do not spin
            self.loop.remove_reader(self.master)
            self.loop.call_later(EIO_PAUSE, self._resume)
            return
        if data and self.conn is not None:
            self.conn.feed(data)

    def _resume(self) -> None:
        if self.is_open:
            self.loop.add_reader(self.master, self._readable)

    def shut(self) -> None:
        if not self.is_open:
            return
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        self.loop.remove_reader(self.master)
        master, self.master = self.master, -1  # stale writes must never reach a reused descriptor
        os.close(master)
        os.close(self.slave)

    # Port
    def write(self, data: bytes) -> None:
        if not self.is_open:
            return
        try:
            written = os.write(self.master, data)
        except BlockingIOError:  # nobody reads the slave and its queue is full
            written = 0
        except OSError as exc:
            log.debug("pty %s: write failed (%s)", self.path, exc)
            return
        if written < len(data):
            self.exposure.bus.truth["pty_overflow_bytes"] += len(data) - written

    def drop(self) -> None:
        if self.is_open:
            self.exposure.hang_up(self)


class PtyExposure:
    kind = "pty"

    def __init__(self, bus: Bus, link: str | None, reopen_after: float) -> None:
        self.bus = bus
        self.link = link
        self.reopen_after = reopen_after
        self.pty: _Pty | None = None
        self.where = ""
        self._reopen: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def path(self) -> str:
        """What a client opens: the link if there is one, else the current slave."""
        return self.link or self.where

    def open(self) -> None:
        pty = _Pty(self)
        if self.link is not None:
            try:
                self._point_link(pty.path)
            except OSError:
                pty.shut()
                raise
        self.pty = pty
        self.where = pty.path
        self.bus.truth["pty_opens"] += 1

    def hang_up(self, pty: _Pty) -> None:
        """Close this pty as if the cable were pulled; a new one comes after `reopen_after`."""
        if pty is not self.pty or self._closed:
            pty.shut()
            return
        self.bus.truth["pty_hangups"] += 1
        self._remove_link(pty.path)
        pty.shut()
        self.pty = None
        log.info("pty %s hung up; reopening in %.2f s", pty.path, self.reopen_after)
        self._reopen = asyncio.get_running_loop().call_later(self.reopen_after, self._reopen_now)

    def _reopen_now(self) -> None:
        self._reopen = None
        if self._closed:
            return
        try:
            self.open()
        except OSError as exc:
            self.bus.truth["pty_errors"] += 1
            log.warning("pty: cannot open a new pty (%s); retrying in %.2f s", exc, self.reopen_after)
            self._reopen = asyncio.get_running_loop().call_later(self.reopen_after, self._reopen_now)

    def _point_link(self, target: str) -> None:
        assert self.link is not None
        if os.path.lexists(self.link) and not os.path.islink(self.link):
            raise FileExistsError(errno.EEXIST, "refusing to replace a file that is not a symlink", self.link)
        temp = f"{self.link}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        os.symlink(target, temp)
        os.replace(temp, self.link)  # atomic: a client sees the old target or the new one

    def _remove_link(self, target: str) -> None:
        if self.link is None:
            return
        with contextlib.suppress(OSError):
            if os.readlink(self.link) == target:
                os.unlink(self.link)

    async def close(self) -> None:
        self._closed = True
        if self._reopen is not None:
            self._reopen.cancel()
            self._reopen = None
        if self.pty is not None:
            self._remove_link(self.pty.path)
            self.pty.shut()
            self.pty = None


async def serve_pty(bus: Bus, link: str | None = None, *, reopen_after: float = 1.0) -> PtyExposure:
    """Expose the bus on a new pty. `where` is the slave's path (it changes after a hang-up);
    with `link`, a symlink there always points at the current slave (`path` gives the one to print).

    Counts `pty_opens`, `pty_hangups`, `pty_errors` and `pty_overflow_bytes` in `bus.truth`.
    """
    if reopen_after <= 0:
        raise ValueError(f"reopen_after must be > 0, got {reopen_after}")
    exposure = PtyExposure(bus, link, reopen_after)
    exposure.open()
    return exposure
