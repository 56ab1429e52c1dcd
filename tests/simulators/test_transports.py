"""The bus on its other exposures, with real parts: pty, pty-as-serial-port, DTU dial-in over TCP, Mosquitto."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator

import aiomqtt
import pytest

from protocols.dlt645 import Accept, Frame, Framer, Reply, decode, read_request
from simulators.bus import Bus, Wire
from simulators.dtu import Backoff, dial_dtu
from simulators.faults import FaultPlan, FaultRule
from simulators.meter import Meter
from simulators.mqtt import serve_mqtt
from simulators.pty import serve_pty
from simulators.serialport import serve_serial

ENERGY = 0x00010000


def make_bus(n: int = 3, faults: FaultPlan | None = None) -> Bus:
    now = time.time()
    meters = [Meter(f"{i:012d}", epoch=now - 70 * 86400, now=now) for i in range(1, n + 1)]
    return Bus("b", meters, Wire(baud=9600, delay_min=0.01, delay_max=0.02), faults=faults)


def check(reply: Reply | None, address: str) -> None:
    assert reply is not None, "no reply"
    assert reply.ok and reply.address == address and reply.di == ENERGY
    assert reply.values and all(q.value >= 0 for q in reply.values.values())


async def eventually(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


class FdLine:
    """A master on a raw file descriptor (a pty side): non-blocking reads driven by the event loop."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_blocking(fd, False)
        self.framer = Framer(Accept.REPLIES)

    @classmethod
    def open(cls, path: str) -> FdLine:
        return cls(os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK))

    async def read(self, timeout: float) -> bytes:
        """Bytes, or b"" at end of file / hang-up (EIO)."""
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        loop.add_reader(self.fd, lambda: ready.done() or ready.set_result(None))
        try:
            await asyncio.wait_for(ready, timeout)
        finally:
            loop.remove_reader(self.fd)
        try:
            return os.read(self.fd, 4096)
        except OSError:
            return b""

    async def ask(self, request: bytes, timeout: float = 3.0) -> Reply | None:
        """None when the line hung up."""
        os.write(self.fd, request)
        deadline = time.monotonic() + timeout
        while True:
            data = await self.read(deadline - time.monotonic())
            if not data:
                return None
            for event in self.framer.feed(data):
                if isinstance(event, Frame):
                    return decode(event)

    def close(self) -> None:
        os.close(self.fd)


# --- pty -----------------------------------------------------------------------------------------

async def test_pty_read_and_client_reopening(tmp_path):
    bus = make_bus()
    link = str(tmp_path / "meters")
    exposure = await serve_pty(bus, link)
    try:
        assert exposure.kind == "pty" and exposure.where.startswith("/dev/pts/")
        assert os.path.realpath(link) == exposure.where
        for _ in range(2):  # the client closes and reopens: the pty keeps serving
            line = FdLine.open(link)
            check(await line.ask(read_request("000000000002", ENERGY)), "000000000002")
            line.close()
        await asyncio.sleep(0.1)
        assert bus.truth["pty_eio"] == 0
    finally:
        await exposure.close()
        await bus.close()
    assert not os.path.lexists(link)


async def test_pty_hangs_up_on_link_drop_and_comes_back(tmp_path):
    bus = make_bus(faults=FaultPlan([FaultRule("link_drop", every=2)]))
    link = str(tmp_path / "meters")
    exposure = await serve_pty(bus, link, reopen_after=0.2)
    try:
        line = FdLine.open(link)
        check(await line.ask(read_request("000000000001", ENERGY)), "000000000001")
        assert await line.ask(read_request("000000000001", ENERGY)) is None  # hung up: EOF
        line.close()
        assert bus.truth["pty_hangups"] == 1 and bus.truth["fault_link_drop"] == 1
        assert not os.path.lexists(link)  # the device is gone while it is down
        await eventually(lambda: os.path.lexists(link))
        assert os.path.realpath(link) == exposure.where
        line = FdLine.open(link)
        check(await line.ask(read_request("000000000003", ENERGY)), "000000000003")
        line.close()
        assert bus.truth["pty_opens"] == 2
    finally:
        await exposure.close()
        await bus.close()


# --- serial port (a pty slave is the device; the test is on the master side) ---------------------

async def test_serial_exposure_over_a_pty_pair():
    master, slave = os.openpty()
    bus = make_bus(faults=FaultPlan([FaultRule("link_drop", every=3)]))
    exposure = await serve_serial(bus, os.ttyname(slave), baud=9600, reopen_after=0.2)
    line = FdLine(master)
    try:
        assert exposure.kind == "serial" and exposure.where == os.ttyname(slave)
        for address in ("000000000001", "000000000002"):
            check(await line.ask(read_request(address, ENERGY)), address)
        with pytest.raises(TimeoutError):  # third request: the port is closed instead of answering
            await line.ask(read_request("000000000001", ENERGY), timeout=0.3)
        assert bus.truth["serial_closes"] == 1
        await eventually(lambda: bus.truth["serial_opens"] == 2)
        check(await line.ask(read_request("000000000003", ENERGY)), "000000000003")
    finally:
        await exposure.close()
        await bus.close()
        line.close()
        os.close(slave)


# --- DTU ---------------------------------------------------------------------------------------------

class Gateway:
    """A TCP server that DTUs dial: hands out each accepted connection."""

    def __init__(self) -> None:
        self.peers: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = asyncio.Queue()
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        await self.peers.put((reader, writer))

    async def peer(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(self.peers.get(), 5.0)


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    gw = Gateway()
    gw.server = await asyncio.start_server(gw._accept, "127.0.0.1", 0)
    gw.port = gw.server.sockets[0].getsockname()[1]
    yield gw
    gw.server.close()
    for writer in gw.writers:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    await gw.server.wait_closed()


async def ask_dtu(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: str) -> tuple[Reply, bytes]:
    """A read through the DTU: the decoded reply and the raw bytes that carried it."""
    writer.write(read_request(address, ENERGY))
    framer, raw = Framer(Accept.REPLIES), b""
    while True:
        data = await asyncio.wait_for(reader.read(4096), 3.0)
        assert data, "the DTU closed the connection"
        raw += data
        for event in framer.feed(data):
            if isinstance(event, Frame):
                return decode(event), raw


REG = b"REG:DTU-0001"


@pytest.mark.parametrize("mode", ["once", "prefix", "both"])
async def test_dtu_registers_as_configured_and_serves_reads(gateway, mode):
    bus = make_bus()
    dtu = await dial_dtu(bus, "127.0.0.1", gateway.port, registration=REG, register_mode=mode)
    try:
        assert dtu.kind == "dtu" and dtu.where == f"dtu -> 127.0.0.1:{gateway.port}"
        reader, writer = await gateway.peer()
        if mode in ("once", "both"):
            assert await asyncio.wait_for(reader.readexactly(len(REG)), 3.0) == REG
        reply, raw = await ask_dtu(reader, writer, "000000000002")
        check(reply, "000000000002")
        assert raw.startswith(REG) == (mode in ("prefix", "both"))
        assert raw.count(b"\x68") >= 2 and raw.endswith(b"\x16")  # one whole frame in one packet
        assert bus.truth["dtu_connects"] == 1
        assert bus.truth["dtu_registrations"] == (0 if mode == "prefix" else 1)
    finally:
        await dtu.close()
        await bus.close()


async def test_dtu_heartbeats_at_the_configured_interval(gateway):
    bus = make_bus()
    dtu = await dial_dtu(bus, "127.0.0.1", gateway.port, registration=REG, heartbeat=b"HB", heartbeat_s=0.2)
    try:
        reader, writer = await gateway.peer()
        assert await asyncio.wait_for(reader.readexactly(len(REG)), 3.0) == REG
        arrivals = []
        for _ in range(4):
            assert await asyncio.wait_for(reader.readexactly(2), 3.0) == b"HB"
            arrivals.append(time.monotonic())
        gaps = [b - a for a, b in itertools.pairwise(arrivals)]
        assert all(0.1 < gap < 1.0 for gap in gaps), gaps  # generous: behaviour, not a timing benchmark
        for address in ("000000000001", "000000000002", "000000000003"):  # a heartbeat never splits a reply
            check((await ask_dtu(reader, writer, address))[0], address)
        assert bus.truth["dtu_heartbeats"] >= 4
    finally:
        await dtu.close()
        await bus.close()


async def test_dtu_redials_and_registers_again(gateway):
    bus = make_bus(faults=FaultPlan([FaultRule("link_drop", every=2)]))
    dtu = await dial_dtu(bus, "127.0.0.1", gateway.port, registration=REG, register_mode="both",
                         reconnect_min=0.05, reconnect_max=0.5)
    try:
        reader, writer = await gateway.peer()
        assert await asyncio.wait_for(reader.readexactly(len(REG)), 3.0) == REG
        writer.close()  # the gateway hangs up
        reader, writer = await gateway.peer()
        assert await asyncio.wait_for(reader.readexactly(len(REG)), 3.0) == REG
        check((await ask_dtu(reader, writer, "000000000003"))[0], "000000000003")
        writer.write(read_request("000000000003", ENERGY))  # second request: the link_drop fault aborts
        assert await asyncio.wait_for(reader.read(), 3.0) == b""
        reader, writer = await gateway.peer()
        assert await asyncio.wait_for(reader.readexactly(len(REG)), 3.0) == REG
        check((await ask_dtu(reader, writer, "000000000001"))[0], "000000000001")
        assert bus.truth["dtu_connects"] == 3 and bus.truth["dtu_disconnects"] == 2
        assert bus.truth["dtu_registrations"] == 3
    finally:
        await dtu.close()
        await bus.close()


async def test_dtu_keeps_dialling_while_nobody_listens(free_port):
    bus = make_bus()
    dtu = await dial_dtu(bus, "127.0.0.1", free_port, registration=REG, reconnect_min=0.05, reconnect_max=0.2)
    try:
        await eventually(lambda: bus.truth["dtu_connect_failures"] >= 3)
        server = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", free_port)
        async with server:
            await asyncio.wait_for(dtu.connected.wait(), 3.0)
    finally:
        await dtu.close()
        await bus.close()


def test_backoff_grows_capped_with_jitter():
    backoff = Backoff(1.0, 30.0)
    delays = [backoff.next() for _ in range(10)]
    assert 1.0 <= delays[0] <= 1.2 and 1.6 <= delays[1] <= 2.4 and delays[-1] <= 30.0
    assert delays[-1] >= 24.0
    backoff.reset()
    assert backoff.next() <= 1.2


# --- MQTT (real Mosquitto) -------------------------------------------------------------------------

async def mqtt_ask(host: str, port: int, topics: tuple[str, str], request: bytes, timeout: float = 5.0) -> bytes:
    """Publish a request, wait for the one message on the response topic."""
    async with aiomqtt.Client(host, port) as client:
        await client.subscribe(topics[1], qos=1)
        await client.publish(topics[0], request, qos=1)
        async with asyncio.timeout(timeout):
            async for message in client.messages:
                assert isinstance(message.payload, bytes)
                return message.payload
    raise AssertionError("unreachable")


@pytest.mark.integration
@pytest.mark.parametrize("encoding", ["binary", "hex"])
async def test_mqtt_request_response(mosquitto, unique_topic, encoding):
    bus = make_bus()
    topics = (f"{unique_topic}/req", f"{unique_topic}/resp")
    url = f"mqtt://{mosquitto.host}:{mosquitto.port}"
    exposure = await serve_mqtt(bus, url, request_topic=topics[0], response_topic=topics[1], encoding=encoding)
    try:
        assert exposure.where == f"{url} {topics[0]} -> {topics[1]}"
        await asyncio.wait_for(exposure.online.wait(), 5.0)
        request = read_request("000000000002", ENERGY)
        if encoding == "hex":
            request = request.hex(" ").encode()
        payload = await mqtt_ask(mosquitto.host, mosquitto.port, topics, request)
        frame = bytes.fromhex(payload.decode()) if encoding == "hex" else payload
        events = Framer(Accept.REPLIES).feed(frame)
        assert len(events) == 1 and isinstance(events[0], Frame)  # exactly one whole frame per message
        check(decode(events[0]), "000000000002")
    finally:
        await exposure.close()
        await bus.close()


@pytest.mark.integration
async def test_mqtt_survives_a_broker_restart(mosquitto, unique_topic):
    bus = make_bus()
    topics = (f"{unique_topic}/req", f"{unique_topic}/resp")
    exposure = await serve_mqtt(bus, f"mqtt://{mosquitto.host}:{mosquitto.port}", request_topic=topics[0],
                                response_topic=topics[1], reconnect_min=0.1, reconnect_max=0.5)
    try:
        await asyncio.wait_for(exposure.online.wait(), 5.0)
        check(decode_one(await mqtt_ask(mosquitto.host, mosquitto.port, topics,
                                        read_request("000000000001", ENERGY))), "000000000001")
        with mosquitto.stopped():
            await eventually(lambda: not exposure.online.is_set())
            await eventually(lambda: bus.truth["mqtt_connect_failures"] >= 1)
        await asyncio.wait_for(exposure.online.wait(), 10.0)
        check(decode_one(await mqtt_ask(mosquitto.host, mosquitto.port, topics,
                                        read_request("000000000003", ENERGY))), "000000000003")
        assert bus.truth["mqtt_connects"] == 2 and bus.truth["mqtt_disconnects"] == 1
    finally:
        await exposure.close()
        await bus.close()


def decode_one(payload: bytes) -> Reply:
    events = Framer(Accept.REPLIES).feed(payload)
    assert len(events) == 1 and isinstance(events[0], Frame), events
    return decode(events[0])


@pytest.mark.integration
async def test_mqtt_publishes_damaged_replies_whole(mosquitto, unique_topic):
    faults = FaultPlan([FaultRule("corrupt", meter="000000000001"), FaultRule("truncated", meter="000000000002"),
                        FaultRule("garbage", meter="000000000003")])
    bus = make_bus(faults=faults)
    topics = (f"{unique_topic}/req", f"{unique_topic}/resp")
    exposure = await serve_mqtt(bus, f"mqtt://{mosquitto.host}:{mosquitto.port}", request_topic=topics[0],
                                response_topic=topics[1], encoding="hex")
    try:
        await asyncio.wait_for(exposure.online.wait(), 5.0)
        kinds = []
        for address in ("000000000001", "000000000002", "000000000003"):
            request = read_request(address, ENERGY).hex().encode()
            payload = bytes.fromhex((await mqtt_ask(mosquitto.host, mosquitto.port, topics, request)).decode())
            framer = Framer(Accept.REPLIES)
            kinds.append([type(e).__name__ for e in framer.feed(payload) + framer.flush()])
        assert kinds[0][0] == "BadChecksum"
        assert kinds[1] == ["TruncatedFrame"]
        assert kinds[2] == ["Garbage", "Frame"]
    finally:
        await exposure.close()
        await bus.close()


@pytest.mark.integration
async def test_mqtt_link_drop_ends_the_session_and_it_comes_back(mosquitto, unique_topic):
    bus = make_bus(faults=FaultPlan([FaultRule("link_drop", every=2)]))
    topics = (f"{unique_topic}/req", f"{unique_topic}/resp")
    exposure = await serve_mqtt(bus, f"mqtt://{mosquitto.host}:{mosquitto.port}", request_topic=topics[0],
                                response_topic=topics[1], client_id=f"sim-{unique_topic[-12:]}",
                                reconnect_min=0.05, reconnect_max=0.5)
    host, port = mosquitto.host, mosquitto.port
    try:
        await asyncio.wait_for(exposure.online.wait(), 5.0)
        check(decode_one(await mqtt_ask(host, port, topics, read_request("000000000001", ENERGY))), "000000000001")
        with pytest.raises(TimeoutError):
            await mqtt_ask(host, port, topics, read_request("000000000001", ENERGY), timeout=0.5)
        assert bus.truth["mqtt_drops"] == 1
        await eventually(lambda: bus.truth["mqtt_connects"] == 2 and exposure.online.is_set())
        check(decode_one(await mqtt_ask(host, port, topics, read_request("000000000002", ENERGY))), "000000000002")
    finally:
        await exposure.close()
        await bus.close()
