"""Sans-I/O protocol codecs: bytes in, typed messages out. No sockets, no asyncio, no config."""
