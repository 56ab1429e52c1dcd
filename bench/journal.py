"""Journal append throughput: N concurrent tasks each appending batches of B readings.

    .venv/bin/python bench/journal.py                 # 10 tasks x 100 readings, 5 s per setting
    .venv/bin/python bench/journal.py --quick         # CI smoke, about 1 s
    .venv/bin/python bench/journal.py --dir /var/lib/meterd-bench   # measure on the box's real disk

Each task awaits its append (an acknowledged, fsynced commit) before sending the
next batch, as collection does. Runs once per commit window (--intervals,
default: the config default 0.2 s and 0 = commit as soon as the writer is free).
Every batch has new (meter, quantity, time) keys, so nothing is a duplicate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.journal import Journal, JournalConfig
from gateway.model import Reading


async def measure(directory: Path, interval: float, tasks: int, batch: int, seconds: float) -> dict[str, float]:
    path = directory / f"bench-{interval}.sqlite"
    latencies: list[float] = []
    async with Journal(path, JournalConfig(commit_interval=interval)) as journal:
        deadline = time.monotonic() + seconds

        async def task(n: int) -> None:
            k = 0
            while time.monotonic() < deadline:
                now = time.time()
                readings = [Reading(f"{n:06d}{i:06d}", "forward_active_energy", 1000.0 + k, "kWh", float(k), now)
                            for i in range(batch)]
                t0 = time.perf_counter()
                await journal.append(readings)
                latencies.append(time.perf_counter() - t0)
                k += 1

        started = time.perf_counter()
        await asyncio.gather(*(task(n) for n in range(tasks)))
        elapsed = time.perf_counter() - started
        stats = dict(journal.stats)
        size = await journal.size()
    for suffix in ("", "-wal", "-shm", ".lock"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    latencies.sort()
    return {
        "commit_interval_s": interval,
        "readings_per_s": round(stats["appended"] / elapsed),
        "appends_per_s": round(len(latencies) / elapsed, 1),
        "commits": int(stats["batches"]),
        "readings_per_commit": round(stats["appended"] / max(1, stats["batches"]), 1),
        "commit_ms_mean": round(1000 * stats["commit_seconds_total"] / max(1, stats["batches"]), 2),
        "append_latency_ms_p50": round(1000 * statistics.median(latencies), 1),
        "append_latency_ms_p99": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 1),
        "bytes_per_reading": round(size["used"] / max(1, stats["appended"]), 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--intervals", type=float, nargs="+", default=[JournalConfig().commit_interval, 0.0])
    parser.add_argument("--dir", type=Path, help="where to put the bench journal (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="0.5 s per setting")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    seconds = 0.5 if args.quick else args.seconds
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = [asyncio.run(measure(Path(tmp), i, args.tasks, args.batch, seconds)) for i in args.intervals]
    for r in results:
        if args.json:
            print(json.dumps(r))
            continue
        print(f"commit_interval={r['commit_interval_s']}s: {r['readings_per_s']:,} readings/s "
              f"({r['appends_per_s']} appends/s of {args.batch}, {args.tasks} tasks), {r['commits']} commits of "
              f"{r['readings_per_commit']} readings, commit {r['commit_ms_mean']} ms, append latency "
              f"p50 {r['append_latency_ms_p50']} ms p99 {r['append_latency_ms_p99']} ms, "
              f"{r['bytes_per_reading']} B/reading")
    return 0


if __name__ == "__main__":
    sys.exit(main())
