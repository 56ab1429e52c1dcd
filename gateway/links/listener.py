"""A TCP listener that DTUs and 4G meters dial into; each identified socket feeds the `PeerLink` of its identity.

Identification (concentrators.md §4): a registration packet (`RegistrationRule`; "once" after connecting, or a
"prefix" of every packet, stripped before the bus sees the bytes), or with `identify="address"` the address in
the first valid DL/T 645 frame. A peer silent for `probe_after` s gets a read-address request (13 to AA..AA),
whose reply carries the address (and a prefix-mode DTU's registration). Heartbeats are dropped and counted; a
socket not identified within `identify_timeout` is closed. `peer(identity)` is the stable PeerLink of an
identity: down until a socket with it arrives; a newer socket replaces (closes) the older one. Identities nobody
asked for are counted and served on a PeerLink that lives as long as their socket. Identities: printable ASCII
registrations as text, others as upper-case hex; addresses as 12 digits.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, ClassVar, cast

from gateway.links.base import RECONNECT_MAX, RECONNECT_MIN, Link, LinkDown, Reconnecting, log
from gateway.links.tcp import Matcher, enable_keepalive, render, strip_heartbeats
from protocols.dlt645 import BROADCAST, Accept, Frame, Framer, read_address_request

if TYPE_CHECKING:
    from gateway.links.config import RegistrationRule

MAX_UNIDENTIFIED_BYTES = 1024  # bytes held while waiting for a registration or a first frame
MAX_UNKNOWN = 1000  # unknown identities remembered by name (the counter counts them all)
PROBE_PREAMBLE = 4
PREFIX_ANYWHERE = 4  # prefixes this long are removed wherever they occur (TCP may merge two packets)


class PeerLink(Link):
    """The link to one identity behind a listener; its `run` only waits (the listener owns the sockets)."""

    kind: ClassVar[str] = "tcp-peer"
    sync_send: ClassVar[bool] = True

    def __init__(self, listener: Listener, identity: str) -> None:
        super().__init__(f"{listener.name}/{identity}")
        self.listener = listener
        self.identity = identity
        self.detail = "waiting for the peer to dial in"
        self._socket: _PeerSocket | None = None

    async def run(self, stop: asyncio.Event) -> None:
        await stop.wait()

    def _write(self, data: bytes) -> None:
        sock = self._socket
        if sock is None or sock.transport is None or sock.transport.is_closing():
            raise LinkDown(f"{self.name}: {self.detail}")
        sock.transport.write(data)

    def _detach(self, sock: _PeerSocket, reason: str, *, quiet: bool = False) -> None:
        if self._socket is sock:
            self._socket = None
            self._set_down(reason, quiet=quiet)


class _PeerSocket(asyncio.Protocol):
    """One accepted connection: identifies itself, then feeds its PeerLink."""

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.where = "?"
        self.peer: PeerLink | None = None
        self.prefix = b""  # prefix mode: the registration, stripped from every packet
        self.repeat = b""  # once mode: the registration, dropped when the DTU sends it again as a heartbeat
        self.reason = ""
        self._pending = b""
        self._framer = Framer(Accept.ALL)
        self._timers: list[asyncio.TimerHandle] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's
        owner = self.listener
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.where = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        enable_keepalive(transport)
        owner.stats["accepted"] += 1
        owner.sockets.add(self)
        owner.unidentified.add(self)
        if len(owner.unidentified) > owner.max_unidentified:
            owner.stats["rejected"] += 1
            self.close("too many unidentified connections")
            return
        loop = asyncio.get_running_loop()
        self._timers.append(loop.call_later(owner.identify_timeout, self._give_up))
        if owner.probe_after is not None:
            self._timers.append(loop.call_later(owner.probe_after, self._probe))

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:
            data = self._clean(data)
            if data:
                self.peer._feed(data)
        elif self.transport is not None and not self.transport.is_closing():
            self._identify(data)

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in self._timers:
            timer.cancel()
        self.listener.sockets.discard(self)
        self.listener.unidentified.discard(self)
        reason = self.reason or (f"connection lost: {exc}" if exc else "closed by the peer")
        if self.peer is not None:
            self.listener._release(self.peer, self, reason)

    def close(self, reason: str) -> None:
        self.reason = reason
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _identify(self, data: bytes) -> None:
        rule = self.listener.registration
        heartbeat = self.listener.heartbeat
        if rule is None:  # by address
            if heartbeat is not None:
                data = self._count_heartbeats(*strip_heartbeats(data, heartbeat))
            for event in self._framer.feed(data):
                if isinstance(event, Frame) and event.address.isdigit() and event.address != BROADCAST:
                    self._identified(event.address)  # the rest of this packet answered our probe: dropped
                    return
            if self._framer.pending > MAX_UNIDENTIFIED_BYTES:
                self._reject("bad_registrations", "no DL/T 645 frame in the first bytes")
            return
        pending = self._pending + data
        try:
            try:
                found = rule.find(pending)
            except ValueError:
                if heartbeat is None:
                    raise
                found = None
            if found is None and heartbeat is not None:  # a heartbeat may come first (prefix mode)
                pending = self._count_heartbeats(*strip_heartbeats(pending, heartbeat))
                found = rule.find(pending)
        except ValueError as exc:
            self._reject("bad_registrations", str(exc))
            return
        if found is None:
            self._pending = pending
            if len(pending) > MAX_UNIDENTIFIED_BYTES:
                self._reject("bad_registrations", f"no registration in the first {len(pending)} bytes")
            return
        size, raw = found
        self._pending = b""
        if rule.prefix:
            self.prefix = pending[:size]
        else:
            self.repeat = pending[:size]
        self._identified(render(raw))
        rest = self._clean(pending[size:])
        if rest and self.peer is not None:
            self.peer._feed(rest)

    def _clean(self, data: bytes) -> bytes:
        if self.prefix:
            if len(self.prefix) >= PREFIX_ANYWHERE:
                self.listener.stats["prefixes_stripped"] += data.count(self.prefix)
                data = data.replace(self.prefix, b"")
            else:
                while data.startswith(self.prefix):
                    data = data[len(self.prefix):]
                    self.listener.stats["prefixes_stripped"] += 1
        if self.repeat:
            data = self._count_heartbeats(*strip_heartbeats(data, self.repeat))
        if self.listener.heartbeat is not None:
            data = self._count_heartbeats(*strip_heartbeats(data, self.listener.heartbeat))
        return data

    def _count_heartbeats(self, data: bytes, count: int) -> bytes:
        if count:
            self.listener.stats["heartbeats"] += count
            if self.peer is not None:
                self.peer.stats["heartbeats"] += count
        return data

    def _identified(self, identity: str) -> None:
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self.listener.unidentified.discard(self)
        self.peer = self.listener._attach(identity, self)

    def _probe(self) -> None:
        if self.peer is not None or self.transport is None or self.transport.is_closing():
            return
        self.listener.stats["probes"] += 1
        self.transport.write(read_address_request(preamble=PROBE_PREAMBLE))
        if self.listener.probe_after is not None:
            self._timers.append(asyncio.get_running_loop().call_later(self.listener.probe_after, self._probe))

    def _give_up(self) -> None:
        if self.peer is None:
            self._reject("unidentified_closed", f"not identified within {self.listener.identify_timeout:g} s")

    def _reject(self, counter: str, why: str) -> None:
        self.listener.stats[counter] += 1
        self.listener.note(counter, f"{self.where}: {why}; closing")
        self.close(why)


class Listener(Reconnecting):
    """Owns the server socket and every accepted socket; see the module docstring."""

    kind: ClassVar[str] = "tcp-listen"

    def __init__(self, name: str, host: str, port: int, *, identify: str = "registration",
                 registration: RegistrationRule | None = None, heartbeat: Matcher | None = None,
                 probe_after: float | None = 2.0, identify_timeout: float = 30.0, max_unidentified: int = 256,
                 reconnect_min: float = RECONNECT_MIN, reconnect_max: float = RECONNECT_MAX) -> None:
        if identify not in ("registration", "address") or (identify == "registration" and registration is None):
            raise ValueError(f"identify must be 'address' or 'registration' (with a rule), got {identify!r}")
        if (probe_after is not None and probe_after <= 0) or identify_timeout <= 0:
            raise ValueError("probe_after and identify_timeout must be > 0")
        if heartbeat == b"":
            raise ValueError("an empty heartbeat would match everything")
        super().__init__(name, reconnect_min=reconnect_min, reconnect_max=reconnect_max)
        self.host = host
        self.port = port  # 0: any free port; the bound one is here once listening
        self.identify = identify
        self.registration = registration if identify == "registration" else None
        self.heartbeat = heartbeat
        self.probe_after = probe_after
        self.identify_timeout = identify_timeout
        self.max_unidentified = max_unidentified
        self.sockets: set[_PeerSocket] = set()
        self.unidentified: set[_PeerSocket] = set()
        self.unknown: set[str] = set()  # identities that dialled in but no meter uses
        self._peers: dict[str, PeerLink] = {}
        self._wanted: set[str] = set()
        self._noted: set[str] = set()

    def peer(self, identity: str) -> PeerLink:
        """The stable link for `identity` (created on first use; down until that peer dials in)."""
        self._wanted.add(identity)
        self.unknown.discard(identity)
        return self._link(identity)

    def _link(self, identity: str) -> PeerLink:
        link = self._peers.get(identity)
        if link is None:
            link = self._peers[identity] = PeerLink(self, identity)
        return link

    def peers(self) -> dict[str, PeerLink]:
        return dict(self._peers)

    def note(self, kind: str, message: str) -> None:
        """The first problem of a kind is a WARNING, repeats are DEBUG (the counters tell how many)."""
        level = logging.DEBUG if kind in self._noted else logging.WARNING
        self._noted.add(kind)
        log.log(level, "%s %s: %s", self.kind, self.name, message)

    async def run(self, stop: asyncio.Event) -> None:
        await self._keep_connected(stop, self._serve)

    async def _serve(self) -> str:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _PeerSocket(self), self.host, self.port, reuse_address=True)
        try:
            self.port = server.sockets[0].getsockname()[1]
            self._set_up(f"listening on {self.host}:{self.port}")
            forever: asyncio.Future[str] = loop.create_future()  # until stopped (cancelled)
            return await forever
        finally:
            server.close()
            for sock in list(self.sockets):
                if sock.peer is not None:
                    sock.peer._detach(sock, "listener stopped", quiet=True)
                    sock.peer = None
                sock.close("listener stopped")
            self._peers = {k: v for k, v in self._peers.items() if k in self._wanted}

    def _attach(self, identity: str, sock: _PeerSocket) -> PeerLink:
        self.stats["identified"] += 1
        if identity not in self._wanted:
            self.stats["unknown_identities"] += 1
            first = identity not in self.unknown and len(self.unknown) < MAX_UNKNOWN
            if first:
                self.unknown.add(identity)
            log.log(logging.WARNING if first else logging.DEBUG, "%s %s: %s identified as %r, which no meter uses",
                    self.kind, self.name, sock.where, identity)
        link = self._link(identity)
        old = link._socket
        if old is not None and old is not sock:
            self.stats["replaced"] += 1
            old.peer = None
            old.close(f"replaced by a new connection from {sock.where}")
        link._socket = sock
        link._set_up(f"{sock.where} as {identity}")
        return link

    def _release(self, link: PeerLink, sock: _PeerSocket, reason: str) -> None:
        link._detach(sock, reason)
        if link.identity not in self._wanted and link._socket is None:
            self._peers.pop(link.identity, None)  # strangers live only as long as their socket
