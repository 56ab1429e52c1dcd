"""meterd against a metersim fleet with faults: the daily round and its re-reads versus the simulator's truth.

The fleet: 40 meters behind two TCP serial servers (20 each, 9600 baud, 5-15 ms reply delay), 2 % no-reply
and 1 % corrupt replies everywhere, one dead meter (line-a), one slow meter (line-b), and link drops on
line-b (the simulator aborts the connection instead of answering every 15th request) while the main round
runs. meterd: one link per server, first-byte timeout 0.5 s (DL/T 645's bound on a meter's response time),
retries 1, and one daily plan whose `at` is a few seconds from now (Asia/Shanghai) with re-reads at +8 s,
+16 s and +24 s. Two servers rather than one: one 40-meter line at 9600 baud needs more than the 8 s
between re-reads for a full round, and rounds must not overlap for the comparison below.

The slow meter answers every request after 0.8 s, past the link's timeout; meterd has
`first_byte_timeout = 1.5` for that meter, the way an engineer handles a known slow meter, so its replies
count as `fault_late_reply` at the simulator but are usable for meterd. (The alternative, a meter slow
only during the main round, puts its late reply on the half-duplex line while meterd already talks to
the next request; on a real bus that is a collision, and what happens depends on timing, so the outcome
could not be predicted exactly from the truth counters.)

The comparison. Between two rounds nothing talks on the lines, so `GET /truth` taken after each round
finished and before the next one started gives, per meter, the counters of exactly that round: requests
R = received + fault_dead; usable replies U = delivered (the slow meter: its undamaged late replies);
failed attempts by kind (no reply: `no_reply` and `dead`; bad frame: `corrupt`; link drop). A meter's job
is two transactions (the freeze time 05060001, then 05060101), each with `retries + 1` = 2 attempts (each
attempt is a request at the simulator), and the reader stops at the first failed transaction. So:

* the meter is collected in the round  <=>  U == 2;
* otherwise, if one of its requests was hit by link_drop: `link_down` (that was its last request);
* otherwise its last transaction either used up both attempts (reason: the kind of the last attempt;
  exact when all its failed attempts are of one kind), or it was refused without (all) its attempts
  because its link was down at that moment (`link_down`, only on a line that dropped in that round), or
  because the meter is degraded (`degraded`, no request at all, after `degrade_after` = 3 consecutive
  failed jobs: the dead meter in the last re-read).

Each meter gets the set of results its counters allow (one element except in rare mixed cases). For every
round: the meters with readings collected in that round (journal) == the meters predicted "ok", the
round's `collected` == their number, and its failure counts per reason == one of the sums the sets allow
(exactly the sum when all are singletons). For the day (`/api/v1/status` today): every live meter
collected, the dead one failed with its last predicted reason, success_ratio == collected / expected; in
the journal, each live meter's frozen readings once, stamped with the freeze time (local midnight).
`METERD_FAULTS_SEED=N` runs the same checks with other random faults.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import json
import math
import os
import selectors
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from tests.server_process import free_tcp_port, http_request

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TZ = ZoneInfo("Asia/Shanghai")
PLAN = "daily"
ITEM = "daily_freeze_forward_active_energy_last1"
TRANSACTIONS = 2  # per meter and round: the freeze time, then the frozen energy
ATTEMPTS = 2  # retries = 1 (the default)
DEGRADE_AFTER = 3  # the default
SEED = int(os.environ.get("METERD_FAULTS_SEED", "20240611"))  # another seed: other random faults, same checks
REREADS = (8.0, 16.0, 24.0)
LEADS = (4.0, 8.0, 16.0)  # s from now to the plan's `at`; meterd must be up and connected by then (else: later)
BUSES = {"line-a": [f"{a:012d}" for a in range(101, 121)], "line-b": [f"{a:012d}" for a in range(121, 141)]}
METERS = [a for meters in BUSES.values() for a in meters]
DEAD = "000000000113"  # on line-a
SLOW = "000000000127"  # on line-b
FIRST_BYTE = 0.5  # s: DL/T 645 gives a meter at most 500 ms to start its reply
INTER_BYTE = 0.2  # s: at 9600 baud the simulator sends a 16-byte chunk every 18 ms
SLOW_DELAY = 0.8  # s: the slow meter's reply delay, past the link's first-byte timeout
SLOW_TIMEOUT = 1.5  # s: meterd's first-byte timeout for that meter
DROP_BUS = "line-b"
DROP_EVERY = 15  # that bus's connection is aborted at every 15th request while the main round runs (a drop
# pre-empted by a no_reply on the same request does not happen: the next one comes 15 requests later)
DROP_WINDOW = 6.0  # s after the main round's start (the first re-read comes at +8 s)


# --- small process helpers (this file's own) -----------------------------------------------------
def _pdeathsig() -> None:  # the child gets SIGTERM if pytest dies
    import ctypes  # noqa: PLC0415

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class Proc:
    """A child process with its output in a file; `stop()` = SIGTERM, then SIGKILL."""

    def __init__(self, argv: list[str], log: Path, *, stdout_pipe: bool = False) -> None:
        self.argv, self.log = argv, log
        self._out = log.open("ab")
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if stdout_pipe else self._out, stderr=self._out,
                                     start_new_session=True, preexec_fn=_pdeathsig)  # noqa: PLW1509

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def read_until(self, word: str, timeout: float) -> list[str]:
        """Lines of stdout up to the line `word` (metersim prints `ready` when everything listens)."""
        assert self.proc.stdout is not None
        lines: list[str] = []
        buf = b""
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    raise AssertionError(f"{self.argv[0]}: no {word!r} within {timeout} s:\n{self.tail()}")
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    raise AssertionError(f"{self.argv[0]} exited ({self.proc.wait()}):\n{self.tail()}")
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    text = line.decode()
                    if text == word:
                        return lines
                    lines.append(text)

    def tail(self, n: int = 40) -> str:
        self._out.flush()
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.send_signal(signal.SIGCONT)  # in case a test froze it
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        return self.proc.returncode


def get_json(url: str) -> Any:
    status, body = http_request("GET", url, timeout=5.0)
    assert status == 200, f"GET {url}: {status} {body[:300]!r}"
    return json.loads(body)


def wait_for(what: str, check: Any, timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            value = check()
            if value:
                return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# --- the setup -----------------------------------------------------------------------------------
def fleet_toml(api_port: int) -> str:
    buses = "".join(f"""
[[buses]]
name = "{name}"
tcp = "127.0.0.1:0"
baud = 9600
reply_delay_ms = [5, 15]
meters = {len(meters)}
first_address = "{meters[0]}"
""" for name, meters in BUSES.items())
    return f"""
seed = {SEED}
[api]
listen = "127.0.0.1:{api_port}"
{buses}
[[faults]]
kind = "no_reply"
probability = 0.02
[[faults]]
kind = "corrupt"
probability = 0.01
[[faults]]
kind = "dead"
meter = "{DEAD}"
[[faults]]
kind = "late_reply"
meter = "{SLOW}"
delay_s = {SLOW_DELAY}
"""


def meterd_toml(state: Path, api_port: int, ports: dict[str, int], at: dt.time) -> str:
    links = "".join(f"""
[[links]]
name = "{name}"
kind = "tcp"
host = "127.0.0.1"
port = {port}
first_byte_timeout = {FIRST_BYTE}
inter_byte_timeout = {INTER_BYTE}
""" for name, port in ports.items())
    meters = "".join(
        f'\n[[meters]]\naddress = "{a}"\nlink = "{name}"\n'
        + (f"first_byte_timeout = {SLOW_TIMEOUT}\n" if a == SLOW else "")
        for name, addresses in BUSES.items() for a in addresses)
    rereads = ", ".join(f'"{r:g}s"' for r in REREADS)
    return f"""
[station]
name = "faults"
timezone = "Asia/Shanghai"
state_dir = "{state}"

[api]
listen = "127.0.0.1:{api_port}"
{links}{meters}
[[plans]]
name = "{PLAN}"
items = ["{ITEM}"]
at = "{at.isoformat()}"
rereads = [{rereads}]
"""


def plan_start(lead: float) -> float:
    """A whole second `lead` s from now, not across a local midnight (the day's figures would split)."""
    now = time.time()
    local = dt.datetime.fromtimestamp(now, TZ)
    to_midnight = (dt.datetime.combine(local.date() + dt.timedelta(days=1), dt.time(), TZ).timestamp() - now)
    if to_midnight < lead + max(REREADS) + 20:
        time.sleep(to_midnight + 1)
        now = time.time()
    return float(math.ceil(now + lead))


def links_up(status_url: str) -> bool:
    return all(get_json(status_url)["links"].get(name, {}).get("up") for name in BUSES)


def put_json(url: str, data: object) -> Any:
    status, body = http_request("PUT", url, json.dumps(data).encode(), timeout=5.0)
    assert status == 200, f"PUT {url}: {status} {body[:300]!r}"
    return json.loads(body)


# --- the model -----------------------------------------------------------------------------------
NR, BAD = "no_reply", "bad_frame"


def delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Counter[str]]:
    out = {}
    for meter, counts in after["meters"].items():
        old = before["meters"].get(meter, {})
        out[meter] = Counter({k: v - old.get(k, 0) for k, v in counts.items()
                              if isinstance(v, int) and v - old.get(k, 0)})
    return out


def usable(meter: str, d: Counter[str]) -> int:
    """Replies meterd can use: delivered ones, and the slow meter's late ones it waits for (undamaged)."""
    if meter == SLOW:
        return d["fault_late_reply"] - d["fault_corrupt"] - d["fault_truncated"]
    return d["delivered"]


def allowed(meter: str, d: Counter[str], *, drop_round: bool, degraded: bool) -> set[str]:
    """Every result ("ok" or a failure reason) of this meter's job that its truth counters allow."""
    requests = d["received"] + d["fault_dead"]
    u = usable(meter, d)
    assert u <= TRANSACTIONS, f"{meter}: {u} usable replies for {TRANSACTIONS} transactions: {dict(d)}"
    if u == TRANSACTIONS:
        return {"ok"}
    if d["fault_link_drop"]:
        return {"link_down"}
    kinds = {NR: d["fault_no_reply"] + d["fault_dead"], BAD: d["fault_corrupt"] + d["fault_truncated"]}
    failed = sum(kinds.values())
    assert requests == u + failed, f"{meter}: requests and outcomes disagree: {dict(d)}"
    results: set[str] = set()
    for last in range(ATTEMPTS + 1):  # failed attempts of the last (unfinished) transaction
        spread = failed - last
        if spread < 0 or spread > u * (ATTEMPTS - 1):
            continue  # the earlier, successful transactions took at most `retries` failures each
        if last == ATTEMPTS:
            results |= {kind for kind, n in kinds.items() if n}
        elif last == 0 and u == 0 and degraded:
            results.add("degraded")
        elif drop_round:
            results.add("link_down")
    assert results, f"{meter}: no history of meterd's fits the truth counters {dict(d)}"
    return results


def sums(choices: list[set[str]]) -> list[Counter[str]]:
    found = []
    for pick in itertools.product(*[sorted(c) for c in choices]):
        total = Counter(r for r in pick if r != "ok")
        if total not in found:
            found.append(total)
    return found


def journal_readings(state: Path) -> list[Any]:
    """Every reading of the plan in meterd's journal, read with the journal's own (read-only) query."""
    from gateway import journal_store  # noqa: PLC0415

    conn = journal_store.connect(state / "journal.sqlite", readonly=True)
    try:
        return [r for r in journal_store.query(conn, limit=100_000) if r.plan == PLAN]
    finally:
        conn.close()


# --- the test ------------------------------------------------------------------------------------
@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in reversed(started):
        p.stop()


def test_daily_round_and_rereads_match_the_simulator_truth(tmp_path: Path, procs: list[Proc]) -> None:
    sim_api = free_tcp_port()
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(fleet_toml(sim_api))
    sim = Proc([str(BIN / "metersim"), "serve", "--fleet", str(fleet)], tmp_path / "metersim.log", stdout_pipe=True)
    procs.append(sim)
    lines = sim.read_until("ready", 20.0)
    ports = {line.split()[0]: int(line.split()[2].rsplit(":", 1)[1]) for line in lines if " tcp " in line}
    assert set(ports) == set(BUSES), lines
    sim_url = f"http://127.0.0.1:{sim_api}"

    for attempt, lead in enumerate(LEADS):  # a loaded machine may need longer to start meterd
        t0 = plan_start(lead)
        put_json(f"{sim_url}/faults", {"scope": "bus", "bus": DROP_BUS, "faults": [
            {"kind": "link_drop", "every": DROP_EVERY, "start": t0 - 0.5, "end": t0 + DROP_WINDOW}]})
        api = free_tcp_port()
        state = tmp_path / f"state{attempt}"
        config = tmp_path / f"meterd{attempt}.toml"
        config.write_text(meterd_toml(state, api, ports, dt.datetime.fromtimestamp(t0, TZ).time()))
        meterd = Proc([str(BIN / "meterd"), "run", "--config", str(config)], tmp_path / f"meterd{attempt}.log")
        procs.append(meterd)
        status_url = f"http://127.0.0.1:{api}/api/v1/status"
        with contextlib.suppress(AssertionError):
            wait_for("meterd's links to be up", partial(links_up, status_url), timeout=t0 - time.time() - 0.3)
        if time.time() < t0 - 0.2:
            break
        assert meterd.stop() == 0, meterd.tail()
    else:
        raise AssertionError(f"meterd was not up and connected {LEADS[-1]} s after it started:\n{meterd.tail()}")

    # One truth snapshot before the main round and one after each round (nothing talks in between).
    snapshots = [get_json(f"{sim_url}/truth")]
    rounds: list[dict[str, Any]] = []
    deadline = t0 + max(REREADS) + 20
    while len(rounds) < 1 + len(REREADS):
        assert meterd.alive, f"meterd exited:\n{meterd.tail()}"
        if time.time() > deadline:
            raise AssertionError(f"only {len(rounds)} rounds finished by now:\n{meterd.tail()}")
        status = get_json(status_url)
        plan = status["plans"].get(PLAN, {"history": [], "running": []})
        done = sorted((r for r in plan["history"] if r["finished"] is not None), key=lambda r: r["started"])
        if len(done) > len(rounds):
            new = done[len(rounds)]
            truth = get_json(f"{sim_url}/truth")
            after = get_json(status_url)["plans"][PLAN]
            late = [r for r in after["running"] if r["started"] < truth["time"]]
            assert not late, f"round {new['reread']}: the next round started before the truth was taken: {late}"
            rounds.append(new)
            snapshots.append(truth)
        time.sleep(0.05)

    readings = journal_readings(state)
    journal = {(r.meter, r.collected) for r in readings}
    bus_of = {m: v["bus"] for m, v in snapshots[0]["meters"].items()}
    missing = set(METERS)  # not collected yet today
    last_dead: set[str] = set()  # the dead meter's result in the latest round
    failed_jobs: Counter[str] = Counter()  # consecutive failed bus jobs per meter (the bus's health)
    report = []
    for n, rnd in enumerate(rounds):
        assert rnd["reread"] == n, f"rounds out of order: {[r['reread'] for r in rounds]}"
        d = delta(snapshots[n + 1], snapshots[n])
        asked = {m for m, c in d.items() if c["received"] + c["fault_dead"]}
        dropped = {bus_of[m] for m, c in d.items() if c["fault_link_drop"]}  # buses whose link dropped
        faults = sum((Counter({k: v for k, v in c.items() if k.startswith("fault_")}) for c in d.values()), Counter())
        in_round = {m for m, when in journal if rnd["started"] <= when <= rnd["finished"]}
        missing_before = missing
        choices = {}
        for m in sorted(missing_before):
            choices[m] = allowed(m, d.get(m, Counter()), drop_round=bus_of[m] in dropped,
                                 degraded=failed_jobs[m] >= DEGRADE_AFTER)
        assert asked <= missing_before, f"round {n}: the simulator was asked for {sorted(asked - missing_before)}"
        predicted_ok = {m for m, c in choices.items() if c == {"ok"}}
        report.append(f"round {n}: expected {rnd['expected']} collected {rnd['collected']} failed {rnd['failed']}"
                      f" | truth: {len(asked)} meters asked, faults {dict(faults)}, "
                      f"drops on {sorted(dropped)}, predicted ok {len(predicted_ok)}, ambiguous "
                      f"{ {m: sorted(c) for m, c in choices.items() if len(c) > 1} }")
        assert rnd["expected"] == len(missing_before), report[-1]
        assert in_round == predicted_ok, (f"round {n}: collected (journal) vs meters with {TRANSACTIONS} usable "
                                          f"replies: extra {sorted(in_round - predicted_ok)}, "
                                          f"missing {sorted(predicted_ok - in_round)}\n" + "\n".join(report))
        assert rnd["collected"] == len(predicted_ok), report[-1]
        reported = Counter(rnd["failed"])
        possible = sums([c for c in choices.values() if c != {"ok"}])
        assert reported in possible, (f"round {n}: meterd's failures {dict(reported)} are not what the truth "
                                      f"implies: {[dict(p) for p in possible]}\n" + "\n".join(report))
        # the bus's health of each meter for the next round: a transaction that failed on the meter's side
        # (no reply, bad frame) counts, a good one resets; a link that was down says nothing about the meter
        for m, c in choices.items():
            good = usable(m, d.get(m, Counter()))
            if c == {"ok"}:
                failed_jobs[m] = 0
            elif c <= {NR, BAD}:
                failed_jobs[m] = failed_jobs[m] + 1 if good == 0 else 1
            elif good:
                failed_jobs[m] = 0
        missing = missing_before - predicted_ok
        last_dead = choices.get(DEAD, set())
        if n == 0:
            assert choices[DEAD] == {NR}, f"the dead meter's main-round result: {choices[DEAD]}"
            assert dropped == {DROP_BUS}, f"no link drop in the main round\n{report[-1]}"

    print("\n".join(report))
    assert missing == {DEAD}, f"meters never collected: {sorted(missing)}\n" + "\n".join(report)
    today = get_json(status_url)["today"]["plans"][PLAN]
    alive = len(METERS) - 1
    assert today["expected"] == len(METERS)
    assert today["collected"] == alive
    # the day keeps the dead meter's root cause; the re-reads that skipped it as degraded do not replace it
    assert today["failed"] == {NR: 1}, (today, last_dead)
    assert today["success_ratio"] == pytest.approx(alive / len(METERS))
    assert {m for m, _ in journal} == set(METERS) - {DEAD}
    # what was stored: the frozen record of today's freeze, stamped with the freeze time, once per meter
    midnight = dt.datetime.combine(dt.datetime.fromtimestamp(t0, TZ).date(), dt.time(), TZ).timestamp()
    per_meter = Counter((r.meter, r.quantity) for r in readings)
    assert set(per_meter.values()) == {1}, [k for k, n in per_meter.items() if n > 1]
    assert {q for _, q in per_meter} == {"forward_active_energy", *(f"forward_active_energy_t{i}" for i in range(1, 5))}
    assert all(r.frozen and r.time == midnight and r.quality == "good" for r in readings), readings[:3]
    assert meterd.alive
    assert meterd.stop() == 0, meterd.tail()
