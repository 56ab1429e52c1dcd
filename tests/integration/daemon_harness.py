"""Real processes for the daemon's acceptance tests: `metersim serve` and `meterd run` as subprocesses.

`Metersim(workdir, fleet)` writes the fleet (a dict, written as TOML), starts `metersim serve --fleet`,
waits for `ready` and parses the lines before it (one per bus: where it listens; then the API).
`Meterd(workdir, config)` writes the daemon's TOML config, runs `meterd run -c` (log appended to
`meterd.log` over restarts), stops it with SIGTERM or SIGKILL, and talks to it: `/api/v1/status`,
`/healthz`, `/metrics`, and its journal through `meterd readings --format json`.
`with processes(a, b):` always stops them (SIGTERM, then SIGKILL); every process also dies with pytest
(PDEATHSIG). `journal_points`, `influx_points` and `vm_points` turn the journal, influxd and
VictoriaMetrics into the same comparable points. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any, TypeVar

from gateway.cli import main as meterd_main
from tests.server_process import _die_with_parent, http_request

BIN = Path(sys.executable).parent
METERD = str(BIN / "meterd")
METERSIM = str(BIN / "metersim")
T = TypeVar("T")


# --- small helpers ------------------------------------------------------------------------------------------------
def wait_until(check: Callable[[], T], timeout: float, what: str, interval: float = 0.1,
               on_timeout: Callable[[], str] | None = None) -> T:
    """Poll `check` until it returns something truthy (returned); OSError/HTTP errors count as not yet."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except (OSError, HTTPException, ValueError, KeyError):
            value = None  # type: ignore[assignment]
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{on_timeout()}" if on_timeout else ""
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(interval)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml(data: dict[str, Any]) -> str:
    """A config as TOML: top-level dicts are [tables], lists of dicts [[arrays of tables]], deeper dicts inline."""
    out = [f"{k} = {_toml_value(v)}" for k, v in data.items()
           if not isinstance(v, dict) and not (isinstance(v, list) and v and all(isinstance(x, dict) for x in v))]
    for key, value in data.items():
        if isinstance(value, dict):
            out += ["", f"[{key}]", *(f"{k} = {_toml_value(v)}" for k, v in value.items())]
        elif isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            for entry in value:
                out += ["", f"[[{key}]]", *(f"{k} = {_toml_value(v)}" for k, v in entry.items())]
    return "\n".join(out) + "\n"


def parse_local(text: str) -> float:
    """An ISO time with an offset (as `meterd readings` prints them) -> UTC seconds."""
    when = dt.datetime.fromisoformat(text)
    assert when.tzinfo is not None, f"time without an offset: {text!r}"
    return when.timestamp()


def _spawn(cmd: list[str], **kw: Any) -> subprocess.Popen[Any]:
    in_main = threading.current_thread() is threading.main_thread()
    return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=_die_with_parent if in_main else None, **kw)  # noqa: PLW1509


def _end(proc: subprocess.Popen[Any] | None, timeout: float) -> int | None:
    """SIGTERM, then SIGKILL after `timeout`; the exit status (negative: killed by that signal)."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} not readable)"


# --- metersim -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class BusLine:
    """One `NAME KIND WHERE (N meters)` line of `metersim serve`."""

    name: str
    kind: str
    where: str
    meters: int

    @property
    def port(self) -> int:
        return int(self.where.rsplit(":", 1)[1])


_BUS_LINE = re.compile(r"^(?P<name>\S+) (?P<kind>\w+) (?P<where>.+) \((?P<n>\d+) meters?\)$")


class Metersim:
    def __init__(self, workdir: Path, fleet: dict[str, Any]) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.fleet_path = workdir / "fleet.toml"
        self.fleet_path.write_text(toml(fleet))
        self.truth_path = workdir / "truth.json"
        self.err_path = workdir / "metersim.err"
        self.buses: dict[str, BusLine] = {}
        self.api_url = ""
        self.proc: subprocess.Popen[str] | None = None
        self.returncode: int | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()

    def __enter__(self) -> Metersim:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self, timeout: float = 20.0) -> Metersim:
        with self.err_path.open("w") as err:
            self.proc = _spawn([METERSIM, "serve", "--fleet", str(self.fleet_path), "--truth", str(self.truth_path)],
                               stdout=subprocess.PIPE, stderr=err, text=True, cwd=self.workdir)
        threading.Thread(target=self._pump, daemon=True, name="metersim-stdout").start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                code = self.stop()
                raise RuntimeError(f"metersim did not get ready (exit {code}):\n{_tail(self.err_path)}")
            if line == "ready":
                return self
            if line.startswith("api "):
                self.api_url = line.split(" ", 1)[1]
            elif m := _BUS_LINE.match(line):
                self.buses[m["name"]] = BusLine(m["name"], m["kind"], m["where"], int(m["n"]))

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def get(self, path: str) -> Any:
        status, body = http_request("GET", self.api_url + path)
        if status != 200:
            raise AssertionError(f"metersim GET {path}: HTTP {status}: {body[:300]!r}")
        return json.loads(body)

    def meter(self, address: str) -> dict[str, Any]:
        return self.get(f"/meters/{address}")  # type: ignore[no-any-return]

    def meters(self) -> list[str]:
        return [m["address"] for m in self.get("/meters")]

    def stop(self) -> int | None:
        """SIGTERM (the fleet writes its truth file and exits 0)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            self.returncode = _end(proc, 15.0)
        return self.returncode

    def truth(self) -> dict[str, Any]:
        return json.loads(self.truth_path.read_text())  # type: ignore[no-any-return]


# --- meterd -------------------------------------------------------------------------------------------------------
class Meterd:
    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.config_path = workdir / "meterd.toml"
        self.config_path.write_text(toml(config))
        self.log_path = workdir / "meterd.log"
        self.api = "http://" + config["api"]["listen"]
        self.state_dir = Path(config["station"]["state_dir"])
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def __enter__(self) -> Meterd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.terminate()

    # --- process ----------------------------------------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> Meterd:
        """Start `meterd run` (its log appended to meterd.log) and wait until its API answers."""
        assert self.proc is None or self.proc.poll() is not None, "meterd is already running"
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"=== start {self.starts} ===\n".encode())
            log.flush()
            self.proc = _spawn([METERD, "run", "-c", str(self.config_path)], stdout=log,
                               stderr=subprocess.STDOUT, cwd=self.workdir)
        proc = self.proc

        def answering() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"meterd exited with {proc.returncode}:\n{self.log_tail()}")
            return http_request("GET", self.api + "/healthz", timeout=2.0)[0] in (200, 503)

        wait_until(answering, timeout, "meterd's API", interval=0.05, on_timeout=self.log_tail)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def terminate(self, timeout: float = 20.0) -> int | None:
        """SIGTERM (SIGKILL after `timeout`); the exit status."""
        proc, self.proc = self.proc, None
        return _end(proc, timeout)

    def kill(self) -> int | None:
        """SIGKILL, no clean-up at all; the exit status (-9)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        return proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        return f"--- {self.log_path} ---\n{_tail(self.log_path, lines)}"

    # --- HTTP -------------------------------------------------------------------------------------------------
    def http(self, path: str) -> tuple[int, bytes]:
        return http_request("GET", self.api + path, timeout=5.0)

    def status(self) -> dict[str, Any]:
        code, body = self.http("/api/v1/status")
        if code != 200:
            raise AssertionError(f"/api/v1/status: HTTP {code}: {body[:300]!r}")
        return json.loads(body)  # type: ignore[no-any-return]

    def healthz(self) -> tuple[int, dict[str, Any]]:
        code, body = self.http("/healthz")
        return code, json.loads(body)

    def metrics(self) -> str:
        code, body = self.http("/metrics")
        assert code == 200, f"/metrics: HTTP {code}"
        return body.decode()

    def wait(self, check: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
        """`wait_until`, failing early (with the log) when meterd has exited."""
        def guarded() -> T:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"meterd exited with {self.proc.returncode}:\n{self.log_tail()}")
            return check()
        return wait_until(guarded, timeout, what, interval, on_timeout=self.log_tail)

    # --- the journal, through `meterd readings` -----------------------------------------------------------------
    def readings_args(self, meter: str, limit: int = 100_000) -> list[str]:
        return ["readings", "--config", str(self.config_path), "--meter", meter, "--format", "json",
                "--limit", str(limit)]

    def readings(self, meter: str) -> list[dict[str, Any]]:
        """`meterd readings --config FILE --meter ADDR --format json`, one dict per reading (times as UTC s).

        Runs the command's `main` in this process: the same code as the console script, without the
        0.5 s of imports per call (`readings_command` runs the installed command itself)."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = meterd_main(self.readings_args(meter))
        assert code == 0, f"meterd readings --meter {meter}: exit {code}: {err.getvalue()}"
        return _rows(out.getvalue())

    def readings_command(self, meter: str) -> list[dict[str, Any]]:
        """`readings()` through the installed `meterd` command in a subprocess."""
        result = subprocess.run([METERD, *self.readings_args(meter)], capture_output=True, text=True, timeout=60,
                                check=False, cwd=self.workdir)
        assert result.returncode == 0, f"meterd readings --meter {meter}: exit {result.returncode}: {result.stderr}"
        return _rows(result.stdout)

    def all_readings(self, meters: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
        return {meter: self.readings(meter) for meter in meters}


def _rows(text: str) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    for row in rows:
        row["time"], row["collected"] = parse_local(row["time"]), parse_local(row["collected"])
    return rows


def settled(status: dict[str, Any], every: float, since: float = 0.8, margin: float = 1.0) -> dict[str, Any] | None:
    """`status` once no round runs, the last one ended `since` s ago or more, every sink has forwarded all it
    had (backlog 0, state ok) and the next `every`-aligned round is more than `margin` s away, so that nothing
    new reaches the journal before meterd is stopped; else None."""
    plans = status["plans"]
    if any(p["running"] for p in plans.values()):
        return None
    now = time.time()
    last = max((p["last"]["finished"] for p in plans.values() if p["last"]), default=0.0)
    if now - last < since or every - now % every <= margin:
        return None
    sinks = status["sinks"].values()
    return status if all(s["backlog"] == 0 and s["state"] == "ok" and s["sent_lines"] > 0 for s in sinks) else None


@contextlib.contextmanager
def processes(*parts: Metersim | Meterd) -> Iterator[None]:
    """Stop every part at the end, whatever happened."""
    try:
        yield
    finally:
        for part in reversed(parts):
            with contextlib.suppress(Exception):
                part.stop() if isinstance(part, Metersim) else part.terminate()


# --- the same readings in the journal, InfluxDB and VictoriaMetrics ---------------------------------------------
# A point: (meter, quantity, frozen, whole second) -> (value, link). That is what a reading becomes in a time-series
# database: InfluxDB keeps one value per series (measurement + tags) and timestamp, and so does VictoriaMetrics.
Key = tuple[str, str, bool, int]
Points = dict[Key, tuple[Any, str]]


def journal_points(readings: Iterable[dict[str, Any]]) -> Points:
    """Journal readings as points; a second reading of the same (meter, quantity, time) is a failure."""
    points: Points = {}
    seen: set[tuple[str, str, float]] = set()
    for r in readings:
        ident = (r["meter"], r["quantity"], r["time"])
        assert ident not in seen, f"the journal holds {ident} twice"
        seen.add(ident)
        key = (r["meter"], r["quantity"], bool(r["frozen"]), int(r["time"] // 1))
        assert key not in points, f"two readings of {key} in one second"
        points[key] = (r["value"], r["link"])
    return points


def influx_points(influx: Any, db: str, measurements: dict[str, str], station: str) -> Points:
    """Every reading point of `station` in an influxd database (measurements: quantity -> measurement)."""
    names = sorted(set(measurements.values()))
    q = f"SELECT * FROM {','.join(f'{chr(34)}{m}{chr(34)}' for m in names)} WHERE \"station\" = '{station}' GROUP BY *"
    points: Points = {}
    for series in influx.query(q, db=db)["results"][0].get("series", []):
        tags = series.get("tags", {})
        for row in series["values"]:
            record = dict(zip(series["columns"], row, strict=True))
            ts = int(dt.datetime.fromisoformat(record.pop("time").replace("Z", "+00:00")).timestamp())
            for field, value in record.items():
                if value is None:
                    continue
                assert measurements.get(field) == series["name"], f"field {field} in measurement {series['name']}"
                key = (tags["meter"], field, tags.get("frozen") == "true", ts)
                assert key not in points, f"{key} twice in InfluxDB"
                points[key] = (value, tags["link"])
    return points


def vm_points(vm: Any, measurements: dict[str, str], station: str) -> Points:
    """Every reading sample of `station` in VictoriaMetrics (series `<measurement>_<field>`; rounds left out)."""
    names = {f"{m}_{q}": q for q, m in measurements.items()}
    points: Points = {}
    for series in vm.export(f'{{station="{station}"}}'):
        metric = series["metric"]
        if metric["__name__"].startswith("collection_"):
            continue
        quantity = names.get(metric["__name__"])
        assert quantity is not None, f"unexpected series in VictoriaMetrics: {metric}"
        for value, ms in zip(series["values"], series["timestamps"], strict=True):
            key = (metric["meter"], quantity, metric.get("frozen") == "true", ms // 1000)
            assert ms % 1000 == 0, f"{key}: timestamp {ms} ms is not a whole second"
            assert key not in points, f"{key} twice in VictoriaMetrics"
            points[key] = (value, metric["link"])
    return points


def diff(expected: Points, actual: Points, limit: int = 10) -> str:
    """What differs, for an assertion message."""
    missing = [k for k in expected if k not in actual]
    extra = [k for k in actual if k not in expected]
    changed = [(k, expected[k], actual[k]) for k in expected if k in actual and expected[k] != actual[k]]
    return (f"{len(missing)} missing (e.g. {missing[:limit]}), {len(extra)} unexpected (e.g. {extra[:limit]}), "
            f"{len(changed)} different (e.g. {changed[:limit]})")
