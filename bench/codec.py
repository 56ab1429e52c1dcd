"""Codec benchmark: our DL/T 645 codec vs PyPI dlt645==3.2.0 (the "peer"), side by side in one run.

Run from the repo root: ``.venv/bin/python bench/codec.py [--quick] [--json]``. The peer lives in its own
venv (``${XDG_CACHE_HOME:-~/.cache}/meterd-bench/peer-venv``, created on first use); this file re-runs itself
there with ``--peer-worker`` (stdlib + dlt645 only), which returns its figures as JSON. Method as in the
reference (dlt645.md §5.5): ``min(timeit.repeat(fn, number=N, repeat=5)) / N`` on V06 with 4xFE.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import struct
import subprocess
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

Json = dict[str, Any]

PEER = "dlt645==3.2.0"
RAW = bytes.fromhex("FE FE FE FE 68 25 04 03 02 01 00 68 91 08 33 33 34 33 75 39 45 33 8B 16")  # V06
ADDRESS = "000102030425"  # nameplate; the wire carries 25 04 03 02 01 00
WIRE = bytes.fromhex("250403020100")
DI = 0x00010000
EXPECTED = 1206.42
DATA = bytes.fromhex("0000010042061200")  # DATA of V06 after removing the 0x33
STREAM_FRAMES = 10_000
SEED = 645
REPEAT = 5
ITERATIONS = {  # number=N per timeit.repeat; the stream is timed as a whole (N=1)
    "full": {"parse": 200_000, "compiled": 20_000, "construct": 5_000, "decode": 100_000, "build": 200_000},
    "quick": {"parse": 20_000, "compiled": 2_000, "construct": 500, "decode": 10_000, "build": 20_000},
}
# (DI, value bytes) of the replies in the stream: energy (4), voltage (2), current (3), power (3)
STREAM_ITEMS = ((0x00000000, 4), (0x00010000, 4), (0x00020000, 4), (0x02010100, 2), (0x02020100, 3), (0x02030000, 3))


def per_call(fn: Callable[[], object], number: int) -> float:
    """Seconds per call, the reference's method."""
    return min(timeit.repeat(fn, number=number, repeat=REPEAT)) / number


def make_stream() -> tuple[list[bytes], str]:
    """10,000 replies with 0/2/4 FE, garbage between some, and chunk sizes 1..64; all from SEED."""
    rng = random.Random(SEED)
    meters = [bytes(rng.randrange(10) << 4 | rng.randrange(10) for _ in range(6)) for _ in range(256)]
    parts: list[bytes] = []
    frames: list[str] = []
    for _ in range(STREAM_FRAMES):
        wire, (di, width) = rng.choice(meters), rng.choice(STREAM_ITEMS)
        data = di.to_bytes(4, "little") + bytes(rng.randrange(10) << 4 | rng.randrange(10) for _ in range(width))
        body = bytes((0x68, *wire, 0x68, 0x91, len(data), *((b + 0x33) & 0xFF for b in data)))
        if rng.random() < 0.1:
            parts.append(rng.randbytes(rng.randint(1, 5)))
        parts.append(b"\xfe" * rng.choice((0, 0, 2, 4)) + body + bytes((sum(body) & 0xFF, 0x16)))
        frames.append(f"{wire.hex()} 91 {data.hex()}")
    stream, chunks, pos = b"".join(parts), [], 0
    while pos < len(stream):
        size = rng.randint(1, 64)
        chunks.append(stream[pos : pos + size])
        pos += size
    return chunks, digest(frames)


def digest(frames: list[str]) -> str:
    return hashlib.sha256("\n".join(frames).encode()).hexdigest()[:16]


def stream_figures(frames: Callable[[list[bytes]], list[Any]], chunks: list[bytes], fmt: Callable[[Any], str]) -> Json:
    """Time `frames` over the whole chunked stream (N=1), then check what it found against the expected list."""
    seconds = min(timeit.repeat(lambda: frames(chunks), number=1, repeat=REPEAT))
    found = [fmt(frame) for frame in frames(chunks)]
    size = sum(map(len, chunks))
    return {"found": len(found), "digest": digest(found), "us": seconds / STREAM_FRAMES * 1e6,
            "frames_per_s": len(found) / seconds, "mb_per_s": size / seconds / 1e6}


def peer_worker(job: Json) -> Json:
    """Runs inside the peer's venv: the stdlib and dlt645 only."""
    from importlib.metadata import version  # noqa: PLC0415

    import dlt645  # type: ignore[import-not-found]  # noqa: PLC0415
    from dlt645 import DLT645Protocol, MeterClientService  # noqa: PLC0415
    from loguru import logger  # type: ignore[import-not-found]  # noqa: PLC0415

    dlt645.disable_logging()  # off by default in 3.2.0; make sure, and drop loguru's own handlers too
    logger.remove()
    logger.disable("dlt645")
    n, deserialize = job["n"], DLT645Protocol.deserialize
    frame = deserialize(RAW)
    assert (bytes(frame.addr), frame.ctrl_code, bytes(frame.data)) == (WIRE, 0x91, DATA), frame
    service = MeterClientService.new_tcp_client("127.0.0.1", 8899)  # never connects
    assert service.set_address(WIRE.hex())  # the peer keeps addresses in wire order
    value = service.handle_response(deserialize(RAW)).value
    assert value == EXPECTED, value
    request = bytes(DLT645Protocol.build_frame(WIRE, 0x11, struct.pack("<I", DI)))  # 4xFE by default
    chunks = [bytes.fromhex(chunk) for chunk in job["chunks"]]

    def frames(chunks: list[bytes]) -> list[Any]:  # the peer's stream API: remaining bytes back from each call
        buf, found = b"", []
        for chunk in chunks:
            buf += chunk
            while True:
                buf, frame = DLT645Protocol.deserialize_with_remaining(buf)
                if frame is None:
                    break
                found.append(frame)
        return found

    return {
        "version": version("dlt645"), "python": platform.python_version(), "value": value, "request": request.hex(),
        "parse": per_call(lambda: deserialize(RAW), n["parse"]),
        "decode": per_call(lambda: service.handle_response(deserialize(RAW)).value, n["decode"]),
        "build": per_call(lambda: DLT645Protocol.build_frame(WIRE, 0x11, struct.pack("<I", DI)), n["build"]),
        "stream": stream_figures(frames, chunks, lambda f: f"{bytes(f.addr).hex()} {f.ctrl_code:02x} {f.data.hex()}"),
    }


def run_peer(job: Json) -> Json:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "meterd-bench"
    venv = cache / "peer-venv"
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"creating {venv} for the peer ({PEER})", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = "import importlib.metadata as m; print(m.version('dlt645'))"
    have = subprocess.run([python, "-c", probe], capture_output=True, text=True, check=False).stdout.strip()
    if have != PEER.split("==")[1]:
        subprocess.run([python, "-m", "pip", "install", "-q", PEER], check=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([python, str(Path(__file__).resolve()), "--peer-worker"], input=json.dumps(job),
                          capture_output=True, text=True, check=False, cwd=cache, env=env)
    if done.returncode:
        sys.exit(f"the peer worker failed ({python}):\n{done.stderr}")
    result: Json = json.loads(done.stdout)
    return result


def run_ours(job: Json) -> Json:
    from protocols.dlt645 import Accept, Frame, Framer, decode, parse, read_request, to_wire  # noqa: PLC0415
    from protocols.dlt645.frame import _ADDRESSES  # noqa: PLC0415
    from protocols.dlt645.requests import build_read_request  # noqa: PLC0415
    from protocols.dlt645.spec import COMPILED_FRAME, FRAME  # noqa: PLC0415

    n, bare = job["n"], RAW.lstrip(b"\xfe")
    assert parse(RAW) == (ADDRESS, 0x91, DATA), parse(RAW)
    for spec in (COMPILED_FRAME, FRAME):
        body = spec.parse(bare).body.value
        assert (body.address, body.control, body.data) == (ADDRESS, 0x91, DATA), body
    reply = decode(parse(RAW))
    value = reply.values["forward_active_energy"].value
    assert value == EXPECTED, reply
    chunks = [bytes.fromhex(chunk) for chunk in job["chunks"]]

    def frames(chunks: list[bytes]) -> list[Any]:
        framer, found = Framer(Accept.REPLIES), []
        for chunk in chunks:
            found += [event for event in framer.feed(chunk) if isinstance(event, Frame)]
        return found

    def cold() -> Frame:
        _ADDRESSES.clear()
        return parse(RAW)

    return {
        "python": platform.python_version(), "value": value, "request": read_request(ADDRESS, DI, preamble=4).hex(),
        "parse": per_call(lambda: parse(RAW), n["parse"]),
        "parse_cold": per_call(cold, n["parse"]),
        "compiled": per_call(lambda: COMPILED_FRAME.parse(bare), n["compiled"]),
        "construct": per_call(lambda: FRAME.parse(bare), n["construct"]),
        "decode": per_call(lambda: decode(parse(RAW)).values["forward_active_energy"].value, n["decode"]),
        "build": per_call(lambda: build_read_request(ADDRESS, DI, preamble=4), n["build"]),  # not the cache
        "stream": stream_figures(frames, chunks,
                                 lambda f: f"{to_wire(f.address).hex()} {f.control:02x} {f.data.hex()}"),
    }


def cpu_model() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
    return f"{names[0] if names else platform.processor() or 'unknown'} ({os.cpu_count()} logical CPUs)"


def report(mode: str, n: Json, ours: Json, peer: Json, stream: Json) -> Json:
    rows = [  # label, iterations, our key, peer key
        ("1 parse: parse(raw) | deserialize(raw)", n["parse"], "parse", "parse"),
        ("1 parse: same, our address cache cleared", n["parse"], "parse_cold", "parse"),
        ("1 parse: COMPILED_FRAME.parse (no FE)", n["compiled"], "compiled", "parse"),
        ("1 parse: FRAME.parse, uncompiled (no FE)", n["construct"], "construct", "parse"),
        ("2 parse+decode -> 1206.42 kWh", n["decode"], "decode", "decode"),
        ("3 stream framing, per frame", 1, "stream", "stream"),
        ("4 build read request 00010000", n["build"], "build", "build"),
    ]
    table = []
    for label, number, mine, theirs in rows:
        us = ours[mine]["us"] if mine == "stream" else ours[mine] * 1e6
        them = peer[theirs]["us"] if theirs == "stream" else peer[theirs] * 1e6
        table.append({"operation": label, "n": number, "ours_us": us, "peer_us": them, "peer_over_ours": them / us})
    return {"mode": mode, "repeat": REPEAT, "python": ours["python"], "peer_python": peer["python"],
            "peer_version": peer["version"], "cpu": cpu_model(), "input": RAW.hex(" ").upper(), "rows": table,
            "stream": {"frames": STREAM_FRAMES, "bytes": stream["bytes"], "chunks": stream["chunks"], "seed": SEED,
                       "ours": ours["stream"], "peer": peer["stream"]},
            "values": {"ours": ours["value"], "peer": peer["value"]},
            "request": {"ours": ours["request"], "peer": peer["request"], "equal": ours["request"] == peer["request"]}}


def show(r: Json) -> None:
    print(f"DL/T 645 codec benchmark ({r['mode']}): meterd vs dlt645=={r['peer_version']} (peer)")
    print(f"Python {r['python']} (peer venv: {r['peer_python']}), {platform.python_implementation()}; CPU {r['cpu']}")
    print(f"input V06 + 4xFE: {r['input']}; min of {r['repeat']} repeats, per frame")
    print(f"\n{'operation':<42}{'n':>8}{'ours µs':>10}{'peer µs':>10}{'peer/ours':>11}")
    for row in r["rows"]:
        print(f"{row['operation']:<42}{row['n']:>8}{row['ours_us']:>10.2f}{row['peer_us']:>10.2f}"
              f"{row['peer_over_ours']:>10.2f}x")
    s = r["stream"]
    print(f"\nstream: {s['frames']} replies, {s['bytes']} bytes in {s['chunks']} chunks of 1..64 (seed {s['seed']})")
    print(f"{'':<6}{'found':>8}{'frames/s':>12}{'MB/s':>8}  frames match")
    for side in ("ours", "peer"):
        f = s[side]
        print(f"{side:<6}{f['found']:>8}{f['frames_per_s']:>12,.0f}{f['mb_per_s']:>8.2f}  {f['match']}")
    print(f"\nvalue: ours {r['values']['ours']} kWh, peer {r['values']['peer']} kWh")
    q = r["request"]
    print(f"request bytes equal: {'yes' if q['equal'] else 'NO'}: ours {q['ours']}, peer {q['peer']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations (CI smoke)")
    parser.add_argument("--json", action="store_true", help="print machine-readable results")
    parser.add_argument("--peer-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_worker:
        print(json.dumps(peer_worker(json.load(sys.stdin))))
        return
    mode = "quick" if args.quick else "full"
    chunks, expected = make_stream()
    job = {"n": ITERATIONS[mode], "chunks": [chunk.hex() for chunk in chunks]}
    peer = run_peer(job)
    ours = run_ours(job)
    for side in (ours, peer):
        side["stream"]["match"] = side["stream"].pop("digest") == expected
    result = report(mode, ITERATIONS[mode], ours, peer, {"bytes": sum(map(len, chunks)), "chunks": len(chunks)})
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        show(result)


if __name__ == "__main__":
    main()
