"""A minimal DL/T 645 master for tests: bytes over any stream, frames through the codec's Framer."""

from __future__ import annotations

import asyncio
import contextlib
import time

from protocols.dlt645 import Accept, Frame, FrameError, Framer, Reply, decode


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.framer = Framer(Accept.REPLIES)
        self.errors: list[FrameError] = []
        self.last_elapsed = 0.0

    @classmethod
    async def tcp(cls, host: str, port: int) -> Client:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    async def frame(self, request: bytes, timeout: float = 3.0) -> Frame | None:
        """Send one request; the first reply frame, or None if only silence/errors came."""
        self.writer.write(request)
        await self.writer.drain()
        start = time.perf_counter()
        deadline = start + timeout
        while True:
            left = deadline - time.perf_counter()
            if left <= 0:
                self.errors += [e for e in self.framer.flush() if isinstance(e, FrameError)]
                return None
            try:
                data = await asyncio.wait_for(self.reader.read(512), left)
            except TimeoutError:
                continue
            if not data:
                return None
            for event in self.framer.feed(data):
                if isinstance(event, Frame):
                    self.last_elapsed = time.perf_counter() - start
                    return event
                self.errors.append(event)

    async def ask(self, request: bytes, timeout: float = 3.0) -> Reply | None:
        frame = await self.frame(request, timeout)
        return None if frame is None else decode(frame)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()
