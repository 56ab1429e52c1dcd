"""Links against real parts: a metersim bus on a TCP socket, on a pty, behind dialling DTUs; config models."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator

import pydantic
import pytest

from gateway.links import (
    Backoff,
    Link,
    LinkDown,
    ListenConfig,
    Listener,
    MqttConfig,
    MqttLink,
    RegistrationRule,
    SerialConfig,
    SerialLink,
    TcpLink,
    build_link,
    parse_link,
)
from protocols.dlt645 import Accept, Frame, Framer, Reply, build, decode, read_request
from simulators.bus import Bus, Wire
from simulators.dtu import dial_dtu
from simulators.faults import FaultPlan, FaultRule
from simulators.meter import Meter
from simulators.pty import serve_pty
from simulators.tcp import serve_tcp

ENERGY = 0x00010000
FAST = {"reconnect_min": 0.05, "reconnect_max": 0.3}


def make_bus(*addresses: str, faults: FaultPlan | None = None, name: str = "b") -> Bus:
    now = time.time()
    meters = [Meter(a, epoch=now - 70 * 86400, now=now) for a in addresses or ("000000000001", "000000000002")]
    return Bus(name, meters, Wire(baud=9600, delay_min=0.01, delay_max=0.02), faults=faults)


async def ask(link: Link, address: str, timeout: float = 3.0) -> Reply:
    """What the bus does: drop stale input, send, read chunks until a whole reply frame; no junk allowed."""
    link.discard_input()
    await link.send(read_request(address, ENERGY))
    framer = Framer(Accept.REPLIES)
    deadline = time.monotonic() + timeout
    while True:
        for event in framer.feed(await link.receive(deadline - time.monotonic())):
            if isinstance(event, Frame):
                assert framer.stats["garbage_bytes"] == 0, "registration or heartbeat bytes reached the bus"
                reply = decode(event)
                assert reply.ok and reply.address == address and reply.di == ENERGY
                return reply


async def eventually(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(*things: Link | Listener) -> AsyncIterator[asyncio.Event]:
    stop = asyncio.Event()
    tasks = [asyncio.create_task(t.run(stop)) for t in things]
    try:
        yield stop
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 5.0)  # run() returns promptly and never raises


def recorder(link: Link | Listener) -> list[tuple[str, bool, str]]:
    calls: list[tuple[str, bool, str]] = []
    link.on_state = lambda name, up, detail: calls.append((name, up, detail))
    return calls


# --- TCP client ------------------------------------------------------------------------------------

async def test_tcp_link_reads_and_survives_a_server_restart_on_the_same_port():
    bus = make_bus()
    exposure = await serve_tcp(bus, "127.0.0.1", 0)
    port = exposure.port
    link = TcpLink("t", "127.0.0.1", port, **FAST)
    states = recorder(link)
    try:
        async with running(link):
            assert await link.wait_up(3.0)
            await ask(link, "000000000001")
            with pytest.raises(TimeoutError):  # nobody answers for a meter that is not there
                await link.receive(0.2)
            await exposure.close()  # the server goes away: no listener, connections dropped
            for conn in list(bus.connections):
                conn.port.drop()
            await eventually(lambda: not link.up)
            with pytest.raises(LinkDown):
                await link.send(read_request("000000000001", ENERGY))
            await eventually(lambda: link.stats["connect_failures"] >= 2)
            exposure = await serve_tcp(bus, "127.0.0.1", port)
            assert await link.wait_up(3.0)
            await ask(link, "000000000002")
        assert [s[:2] for s in states] == [("t", True), ("t", False), ("t", True), ("t", False)]
        assert link.stats["connects"] == 2 and link.stats["disconnects"] == 1
    finally:
        await exposure.close()
        await bus.close()


async def test_a_drop_during_receive_raises_link_down_and_the_link_comes_back():
    bus = make_bus(faults=FaultPlan([FaultRule("link_drop", every=2)]))
    exposure = await serve_tcp(bus, "127.0.0.1", 0)
    link = TcpLink("t", "127.0.0.1", exposure.port, **FAST)
    try:
        async with running(link):
            assert await link.wait_up(3.0)
            await ask(link, "000000000001")
            with pytest.raises(LinkDown):
                await ask(link, "000000000001")  # the server aborts instead of answering
            assert await link.wait_up(3.0)
            await ask(link, "000000000002")
    finally:
        await exposure.close()
        await bus.close()


async def test_bytes_before_a_drop_are_still_read_and_a_cancelled_run_reports_down():
    async def answer_and_hang_up(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"last words")
        writer.close()

    server = await asyncio.start_server(answer_and_hang_up, "127.0.0.1", 0)
    link = TcpLink("t", "127.0.0.1", server.sockets[0].getsockname()[1], reconnect_min=5.0, reconnect_max=5.0)
    task = asyncio.create_task(link.run(asyncio.Event()))
    try:
        assert await link.wait_up(3.0)
        await eventually(lambda: not link.up)
        assert link.detail == "closed by the other side"
        assert await link.receive(1.0) == b"last words"
        with pytest.raises(LinkDown):
            await link.receive(1.0)
        assert await link.wait_up(0.1) is False
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        server.close()
    assert not link.up and link.detail == "stopped"


# --- serial over a real pty ------------------------------------------------------------------------

async def test_serial_link_on_a_pty_that_hangs_up_and_comes_back(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gateway.links")
    bus = make_bus(faults=FaultPlan([FaultRule("link_drop", every=2)]))
    device = str(tmp_path / "ttyMeters")
    exposure = await serve_pty(bus, device, reopen_after=0.3)
    link = SerialLink("s", device, **FAST)  # parity E by default: a pty cannot hold it
    states = recorder(link)
    try:
        async with running(link):
            assert await link.wait_up(3.0)
            assert link.tx_time(10) == pytest.approx(10 * 11 / 2400)
            await ask(link, "000000000001")
            with pytest.raises(LinkDown):
                await ask(link, "000000000001")  # the pty hangs up instead of answering
            assert not link.up
            assert await link.wait_up(5.0)  # the symlink is back, pointing at a new pty
            await ask(link, "000000000002")
        assert [s[1] for s in states] == [True, False, True, False]
        assert link.stats["connects"] == 2 and link.stats["connect_failures"] >= 1
        assert bus.truth["pty_hangups"] == 1
        noted = [r for r in caplog.records if "cannot hold parity" in r.getMessage()]
        assert len(noted) == 1
    finally:
        await exposure.close()
        await bus.close()


# --- listener: DTUs dialling in --------------------------------------------------------------------

@contextlib.asynccontextmanager
async def listening(listener: Listener) -> AsyncIterator[Listener]:
    async with running(listener):
        assert await listener.wait_up(3.0)
        yield listener


async def test_registration_once_with_heartbeats_and_an_unknown_dtu():
    rule = RegistrationRule(re.compile(rb"REG:(?P<id>DTU-\d{4})"))
    listener = Listener("l", "127.0.0.1", 0, registration=rule, heartbeat=b"HB", **FAST)
    bus1, bus2, bus3 = make_bus("000000000001"), make_bus("000000000002"), make_bus("000000000003")
    async with listening(listener):
        peer1, peer2 = listener.peer("DTU-0001"), listener.peer("DTU-0002")
        assert not peer1.up and peer1.kind == "tcp-peer" and peer1.name == "l/DTU-0001"
        dtus = [await dial_dtu(bus1, "127.0.0.1", listener.port, registration=b"REG:DTU-0001",
                               heartbeat=b"HB", heartbeat_s=0.1),
                # a heartbeat that repeats the registration packet (common) is dropped too
                await dial_dtu(bus2, "127.0.0.1", listener.port, registration=b"REG:DTU-0002",
                               heartbeat=b"REG:DTU-0002", heartbeat_s=0.1),
                await dial_dtu(bus3, "127.0.0.1", listener.port, registration=b"REG:DTU-7777")]
        try:
            assert await peer1.wait_up(3.0) and await peer2.wait_up(3.0)
            for _ in range(3):
                await ask(peer1, "000000000001")
                await ask(peer2, "000000000002")
                await asyncio.sleep(0.15)
            assert peer1.stats["heartbeats"] >= 2 and peer2.stats["heartbeats"] >= 2
            await eventually(lambda: listener.stats["unknown_identities"] == 1)
            assert listener.unknown == {"DTU-7777"} and "DTU-7777" in listener.peers()
            await ask(listener.peers()["DTU-7777"], "000000000003")  # served all the same
        finally:
            for dtu in dtus:
                await dtu.close()
        await eventually(lambda: "DTU-7777" not in listener.peers())  # strangers go with their socket
    assert listener.stats["identified"] == 3 and not peer1.up
    for bus in (bus1, bus2, bus3):
        await bus.close()


@pytest.mark.parametrize("mode", ["prefix", "both"])
async def test_registration_as_prefix_is_stripped_and_a_silent_dtu_is_probed(mode):
    rule = RegistrationRule(b"REG:", length=12, mode=mode)
    listener = Listener("l", "127.0.0.1", 0, registration=rule, heartbeat=b"HB", probe_after=0.2, **FAST)
    bus = make_bus("000000000001", "000000000002")
    async with listening(listener):
        peer = listener.peer("REG:DTU-0003")
        dtu = await dial_dtu(bus, "127.0.0.1", listener.port, registration=b"REG:DTU-0003", register_mode=mode,
                             heartbeat=b"HB", heartbeat_s=0.05)
        try:
            assert await peer.wait_up(3.0)
            for address in ("000000000001", "000000000002", "000000000001"):
                await ask(peer, address)
        finally:
            await dtu.close()
    assert listener.stats["prefixes_stripped"] >= 3
    if mode == "prefix":  # it says nothing before it has data: only the probe's reply identifies it
        assert listener.stats["probes"] >= 1
    await bus.close()


async def test_dtu_redialling_after_a_drop_comes_back_on_the_same_peer_link():
    listener = Listener("l", "127.0.0.1", 0, registration=RegistrationRule(length=12), **FAST)
    bus = make_bus("000000000001", faults=FaultPlan([FaultRule("link_drop", every=2)]))
    async with listening(listener):
        peer = listener.peer("REG:DTU-0001")
        states = recorder(peer)
        dtu = await dial_dtu(bus, "127.0.0.1", listener.port, registration=b"REG:DTU-0001",
                             reconnect_min=0.05, reconnect_max=0.2)
        try:
            assert await peer.wait_up(3.0)
            await ask(peer, "000000000001")
            with pytest.raises(LinkDown):
                await ask(peer, "000000000001")  # the DTU aborts the connection
            assert await peer.wait_up(3.0)
            await ask(peer, "000000000001")
        finally:
            await dtu.close()
        await eventually(lambda: not peer.up)
    assert [s[:2] for s in states] == [("l/REG:DTU-0001", True), ("l/REG:DTU-0001", False),
                                       ("l/REG:DTU-0001", True), ("l/REG:DTU-0001", False)]
    await bus.close()


async def test_a_duplicate_identity_replaces_the_connected_socket():
    listener = Listener("l", "127.0.0.1", 0, registration=RegistrationRule(b"REG:DTU-0009"), **FAST)
    old_bus, new_bus = make_bus("000000000001", name="old"), make_bus("000000000002", name="new")
    async with listening(listener):
        peer = listener.peer("REG:DTU-0009")
        states = recorder(peer)
        old = await dial_dtu(old_bus, "127.0.0.1", listener.port, registration=b"REG:DTU-0009",
                             reconnect_min=10.0, reconnect_max=10.0)  # it must not come back during the test
        new = None
        try:
            assert await peer.wait_up(3.0)
            await ask(peer, "000000000001")
            new = await dial_dtu(new_bus, "127.0.0.1", listener.port, registration=b"REG:DTU-0009")
            await eventually(lambda: listener.stats["replaced"] == 1)
            await eventually(lambda: old_bus.truth["dtu_disconnects"] == 1)  # the old socket was closed
            assert peer.up
            await ask(peer, "000000000002")  # the same PeerLink now reaches the new DTU
        finally:
            await old.close()
            if new is not None:
                await new.close()
    assert [s[1] for s in states] == [True, False]  # replacing is not a down/up change
    assert peer.stats["replaced"] == 1
    await old_bus.close()
    await new_bus.close()


async def test_identify_by_address_probes_a_silent_dtu():
    listener = Listener("l", "127.0.0.1", 0, identify="address", probe_after=0.2, **FAST)
    bus = make_bus("000000000042")
    async with listening(listener):
        peer = listener.peer("000000000042")
        dtu = await dial_dtu(bus, "127.0.0.1", listener.port)  # no registration at all
        try:
            assert await peer.wait_up(3.0)
            await ask(peer, "000000000042")
        finally:
            await dtu.close()
    assert listener.stats["probes"] >= 1 and listener.stats["identified"] == 1
    await bus.close()


async def test_identify_by_the_address_in_the_first_frame_and_send_to_the_peer():
    listener = Listener("l", "127.0.0.1", 0, identify="address", probe_after=None, **FAST)
    async with listening(listener):
        peer = listener.peer("000000000077")
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        try:
            writer.write(b"\xfe\xfe" + build("000000000077", 0x93, bytes.fromhex("770000000000")))
            assert await peer.wait_up(3.0)
            await peer.send(b"ping")
            assert await asyncio.wait_for(reader.readexactly(4), 3.0) == b"ping"
            writer.write(b"pong")
            assert await peer.receive(3.0) == b"pong"
        finally:
            writer.close()
        await eventually(lambda: not peer.up)
        assert peer.detail == "closed by the peer"


async def test_unidentified_and_badly_registered_sockets_are_closed():
    rule = RegistrationRule(b"REG:", length=12)
    listener = Listener("l", "127.0.0.1", 0, registration=rule, probe_after=None, identify_timeout=0.3, **FAST)
    async with listening(listener):
        silent = await asyncio.open_connection("127.0.0.1", listener.port)
        bad = await asyncio.open_connection("127.0.0.1", listener.port)
        bad[1].write(b"HELLO")
        assert await asyncio.wait_for(bad[0].read(), 3.0) == b""
        assert await asyncio.wait_for(silent[0].read(), 3.0) == b""
        for _, writer in (silent, bad):
            writer.close()
    assert listener.stats["bad_registrations"] == 1 and listener.stats["unidentified_closed"] == 1
    assert listener.stats["accepted"] == 2 and not listener.peers()


# --- pieces ----------------------------------------------------------------------------------------

def test_backoff_grows_capped_with_jitter():
    backoff = Backoff(0.5, 30.0)
    delays = [backoff.next() for _ in range(12)]
    assert 0.5 <= delays[0] <= 0.6 and 0.8 <= delays[1] <= 1.2 and max(delays) <= 30.0 and delays[-1] >= 24.0
    backoff.reset()
    assert backoff.next() <= 0.6


def test_registration_rules():
    assert RegistrationRule(b"REG:", length=8).find(b"REG:0001\x68") == (8, b"REG:0001")
    assert RegistrationRule(b"REG:", length=8).find(b"REG") is None
    with pytest.raises(ValueError, match="not a registration"):
        RegistrationRule(b"REG:", length=8).find(b"XY")
    assert RegistrationRule(re.compile(rb"ID(\d+);")).find(b"ID42;rest") == (5, b"42")
    with pytest.raises(ValueError, match="cannot be combined"):
        RegistrationRule(re.compile(rb"x"), length=3)


def test_link_configs_validate_and_build():
    serial = parse_link({"kind": "serial", "name": "rs485-1", "port": "/dev/ttyUSB0"})
    assert isinstance(serial, SerialConfig) and (serial.baud, serial.parity, serial.stopbits) == (2400, "E", 1)
    assert (serial.first_byte_timeout_s, serial.inter_byte_timeout_s) == (1.0, 0.1)
    assert isinstance(build_link(serial), SerialLink)
    tcp = parse_link({"kind": "tcp", "name": "ser-srv", "host": "127.0.0.1", "port": 4001, "retries": 2})
    assert (tcp.first_byte_timeout_s, tcp.inter_byte_timeout_s, tcp.retries) == (1.0, 0.5, 2)
    assert isinstance(build_link(tcp), TcpLink)
    listen = parse_link({"kind": "tcp-listen", "name": "dtus", "listen": "127.0.0.1:9100",
                         "registration": {"match": "hex:52 45 47 3A", "length": 12, "mode": "prefix"},
                         "heartbeat": "text:HB", "first_byte_timeout": 5})
    assert isinstance(listen, ListenConfig) and listen.identify == "registration"
    assert (listen.host, listen.port, listen.first_byte_timeout_s) == ("127.0.0.1", 9100, 5.0)
    built = build_link(listen)
    assert isinstance(built, Listener) and built.registration == RegistrationRule(b"REG:", 12, "prefix")
    assert parse_link({"kind": "tcp-listen", "name": "m4g"}).identify == "address"
    mqtt = parse_link({"kind": "mqtt", "name": "m", "url": "mqtt://u:p@127.0.0.1:1883", "request_topic": "a/req",
                       "response_topic": "a/resp", "encoding": "hex"})
    assert isinstance(mqtt, MqttConfig) and mqtt.first_byte_timeout_s == 10.0
    link = build_link(mqtt)
    assert isinstance(link, MqttLink) and link.url == "mqtt://127.0.0.1:1883" and link.username == "u"


@pytest.mark.parametrize(("data", "message"), [
    ({"kind": "serial", "name": "s", "port": "/dev/x", "baudrate": 9600}, "Extra inputs are not permitted"),
    ({"kind": "serial", "name": "s", "port": "/dev/x", "parity": "X"}, "parity"),
    ({"kind": "serial", "name": "s", "port": "/dev/x", "stopbits": 3}, "stopbits must be 1, 1.5 or 2"),
    ({"kind": "tcp", "name": "t", "host": "h", "port": 70000}, "less than or equal to 65535"),
    ({"kind": "tcp", "name": "bad name", "host": "h", "port": 1}, "name"),
    ({"kind": "udp", "name": "u"}, "does not match any of the expected tags"),
    ({"kind": "tcp-listen", "name": "l", "identify": "registration"}, "needs a [registration]"),
    ({"kind": "tcp-listen", "name": "l", "listen": "9100"}, "expected HOST:PORT"),
    ({"kind": "tcp-listen", "name": "l", "identify": "address", "registration": {"length": 4}}, "takes no"),
    ({"kind": "tcp-listen", "name": "l", "registration": {"match": "hex:zz"}}, "not hex"),
    ({"kind": "tcp-listen", "name": "l", "registration": {"match": "REG"}}, "expected 'hex:...'"),
    ({"kind": "tcp-listen", "name": "l", "heartbeat": "regex:("}, "bad regex"),
    ({"kind": "mqtt", "name": "m", "url": "http://x", "request_topic": "a", "response_topic": "b"}, "mqtt://"),
    ({"kind": "mqtt", "name": "m", "url": "mqtt://x", "request_topic": "a/+", "response_topic": "b"}, "wildcards"),
    ({"kind": "tcp", "name": "t", "host": "h", "port": 1, "reconnect_min": 5, "reconnect_max": 1}, "reconnect_max"),
])
def test_link_config_errors_are_readable(data, message):
    with pytest.raises(pydantic.ValidationError) as info:
        parse_link(data)
    assert message in str(info.value)


class Taker:
    """A Receiver (see Link.attach) that keeps what it is handed."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.losses: list[str] = []

    def data(self, chunk: bytes) -> None:
        self.chunks.append(chunk)

    def lost(self, reason: str) -> None:
        self.losses.append(reason)


async def test_an_attached_receiver_gets_the_inbox_first_then_every_chunk_and_the_drop():
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"early")
        while data := await reader.read(64):
            if data == b"bye":
                writer.transport.abort()
                return
            writer.write(data.upper())

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    link = TcpLink("t", "127.0.0.1", server.sockets[0].getsockname()[1], reconnect_min=5.0, reconnect_max=5.0)
    taker = Taker()
    try:
        async with running(link):
            assert await link.wait_up(3.0)
            await eventually(lambda: link.stats["bytes_in"] == 5)
            link.attach(taker)
            assert taker.chunks == [b"early"]  # what waited in the inbox is handed over
            await link.send(b"abc")
            await eventually(lambda: taker.chunks == [b"early", b"ABC"])
            link.detach(taker)
            await link.send(b"def")
            assert await link.receive(3.0) == b"DEF"  # detached: back to the inbox
            link.attach(taker)
            await link.send(b"bye")
            await eventually(lambda: bool(taker.losses))
            assert taker.losses == ["closed by the other side"] and not link.up
    finally:
        server.close()


async def test_a_receiver_on_a_peer_link_is_told_when_a_new_socket_replaces_the_old_one():
    listener = Listener("l", "127.0.0.1", 0, identify="address", probe_after=None, **FAST)
    frame = b"\xfe\xfe" + build("000000000077", 0x93, bytes.fromhex("770000000000"))
    async with listening(listener):
        peer = listener.peer("000000000077")
        _, first = await asyncio.open_connection("127.0.0.1", listener.port)
        _, second = await asyncio.open_connection("127.0.0.1", listener.port)
        try:
            first.write(frame)
            assert await peer.wait_up(3.0)
            taker = Taker()
            peer.attach(taker)
            first.write(b"\x01\x02")
            await eventually(lambda: taker.chunks == [b"\x01\x02"])
            second.write(frame)
            await eventually(lambda: listener.stats["replaced"] == 1)
            assert taker.losses == ["the connection was replaced"]
        finally:
            first.close()
            second.close()
