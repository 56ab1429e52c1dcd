"""Prometheus exposition: collection statistics read at scrape time, plus callback metrics.

Each `Metrics` has its own `CollectorRegistry`, so several daemons in one process never collide.
Nothing is updated per outcome: a custom collector reads `CollectionStats.snapshot()` when scraped.
Other parts (journal, sinks) expose their own counters without being imported here:

    metrics.register_gauge_callback("meterd_journal_backlog", "Readings not yet forwarded, per sink",
                                    ["sink"], lambda: {(name,): float(n) for name, n in journal.backlog().items()})

`fn` returns a float (no labels) or a mapping of label-value tuples to floats. Use `kind="counter"`
for monotonically increasing values (the name then ends in `_total`). A callback that raises is
skipped for that scrape, logged once until it works again, and counted in
`meterd_metrics_callback_errors_total`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from gateway.stats import CollectionStats

log = logging.getLogger("meterd.metrics")

Samples = Mapping[tuple[str, ...], float] | float
_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_RESERVED_PREFIXES = ("meterd_collection_", "meterd_rounds_", "meterd_outcomes_", "meterd_meters_",
                      "meterd_link_up", "meterd_last_round_", "meterd_info", "meterd_uptime",
                      "meterd_metrics_callback_errors", "meterd_orphan_outcomes")


@dataclass(frozen=True, slots=True)
class Callback:
    name: str
    help: str
    labels: tuple[str, ...]
    fn: Callable[[], Samples]
    kind: Literal["gauge", "counter"]


def _gauge(name: str, doc: str, labels: Sequence[str], rows: Iterable[tuple[Sequence[str], float]]) -> Metric:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in rows:
        family.add_metric(values, value)
    return family


def _counter(name: str, doc: str, labels: Sequence[str], rows: Iterable[tuple[Sequence[str], float]]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for values, value in rows:
        family.add_metric(values, value)
    return family


class StatsCollector(Collector):
    """Turns one snapshot of `CollectionStats` into metric families."""

    def __init__(self, stats: CollectionStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        snap = self.stats.snapshot(top=0)
        today: dict[str, Any] = snap["today"]
        yield _gauge("meterd_info", "Station and timezone of this meterd", ["station", "timezone"],
                     [((snap["station"], snap["timezone"]), 1.0)])
        yield _gauge("meterd_uptime_seconds", "Seconds since collection statistics started", [],
                     [((), snap["uptime"])])
        for key, label, doc in (("plans", "plan", "plan"), ("areas", "area", "station area"),
                                ("links", "link", "link")):
            rows: dict[str, dict[str, Any]] = today[key]
            yield _gauge(f"meterd_collection_{label}_success_ratio",
                         f"Distinct meters collected / expected today (local day), per {doc}", [label],
                         [((k,), v["success_ratio"]) for k, v in rows.items() if v["success_ratio"] is not None])
            yield _gauge(f"meterd_collection_{label}_expected", f"Meters expected today, per {doc}", [label],
                         [((k,), v["expected"]) for k, v in rows.items()])
            yield _gauge(f"meterd_collection_{label}_collected", f"Meters collected today, per {doc}", [label],
                         [((k,), v["collected"]) for k, v in rows.items()])
            yield _gauge(f"meterd_collection_{label}_failed", f"Meters not collected today by reason, per {doc}",
                         [label, "reason"],
                         [((k, r), n) for k, v in rows.items() for r, n in v["failed"].items()])
        plans: dict[str, dict[str, Any]] = snap["plans"]
        yield _counter("meterd_rounds", "Rounds finished", ["plan"],
                       [((p,), v["rounds_total"]) for p, v in plans.items()])
        yield _gauge("meterd_rounds_running", "Rounds running now", ["plan"],
                     [((p,), len(v["running"])) for p, v in plans.items()])
        last = {p: v["last"] for p, v in plans.items() if v["last"]}
        yield _gauge("meterd_last_round_duration_seconds", "Duration of the last finished round", ["plan"],
                     [((p,), r["duration"]) for p, r in last.items()])
        yield _gauge("meterd_last_round_success_ratio", "Collected / expected in the last finished round", ["plan"],
                     [((p,), r["success_ratio"]) for p, r in last.items() if r["success_ratio"] is not None])
        outcomes: dict[str, dict[str, int]] = snap["outcomes_total"]
        yield _counter("meterd_outcomes", "Meter jobs by plan and result (ok or the failure reason)",
                       ["plan", "result"], [((p, r), n) for p, c in outcomes.items() for r, n in c.items()])
        yield _counter("meterd_orphan_outcomes", "Outcomes reported for a round that was not started", [],
                       [((), snap["orphan_outcomes"])])
        meters = snap["meters"]
        yield _gauge("meterd_meters_known", "Meters with at least one outcome", [], [((), meters["known"])])
        yield _gauge("meterd_meters_failing", "Meters whose last attempt failed", [], [((), meters["failing"])])
        yield _gauge("meterd_meters_degraded", "Meters failing repeatedly (degraded)", [], [((), meters["degraded"])])
        yield _gauge("meterd_link_up", "1 when the link is up", ["link"],
                     [((k,), 1.0 if v["up"] else 0.0) for k, v in snap["links"].items()])


class CallbackCollector(Collector):
    def __init__(self) -> None:
        self.callbacks: dict[str, Callback] = {}
        self.errors = 0
        self._failing: set[str] = set()

    def collect(self) -> Iterator[Metric]:
        for cb in list(self.callbacks.values()):
            try:
                rows = self._rows(cb)
            except Exception as exc:  # a broken callback must not break the scrape
                self.errors += 1
                if cb.name not in self._failing:
                    log.warning("metric %s: callback failed: %r (skipped until it works)", cb.name, exc)
                    self._failing.add(cb.name)
                continue
            self._failing.discard(cb.name)
            yield (_counter if cb.kind == "counter" else _gauge)(cb.name, cb.help, cb.labels, rows)
        yield _counter("meterd_metrics_callback_errors", "Scrapes where a registered callback raised", [],
                       [((), self.errors)])

    @staticmethod
    def _rows(cb: Callback) -> list[tuple[tuple[str, ...], float]]:
        value = cb.fn()
        if not isinstance(value, Mapping):
            if cb.labels:
                raise TypeError(f"expected a mapping of {cb.labels} tuples to numbers, got {type(value).__name__}")
            return [((), float(value))]
        rows = []
        for key, v in value.items():
            if len(key) != len(cb.labels):
                raise ValueError(f"label values {key!r} do not match labels {cb.labels!r}")
            rows.append((tuple(str(k) for k in key), float(v)))
        return rows


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, stats: CollectionStats) -> None:
        self.stats = stats
        self.registry = CollectorRegistry(auto_describe=False)
        self._callbacks = CallbackCollector()
        self.registry.register(StatsCollector(stats))
        self.registry.register(self._callbacks)

    def register_gauge_callback(self, name: str, help: str, labels: Sequence[str], fn: Callable[[], Samples],
                                *, kind: Literal["gauge", "counter"] = "gauge") -> None:
        """Expose `fn()` as a metric at every scrape. Raises ValueError on a bad or taken name."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"bad metric name {name!r}")
        if name.startswith(_RESERVED_PREFIXES):
            raise ValueError(f"metric name {name!r} is reserved for collection statistics")
        base = name.removesuffix("_total")
        if any(n.removesuffix("_total") == base for n in self._callbacks.callbacks):
            raise ValueError(f"metric {name!r} is already registered")
        for label in labels:
            if not _LABEL.fullmatch(label) or label.startswith("__"):
                raise ValueError(f"bad label name {label!r} for metric {name!r}")
        self._callbacks.callbacks[name] = Callback(name, help, tuple(labels), fn, kind)

    def unregister_callback(self, name: str) -> None:
        self._callbacks.callbacks.pop(name, None)

    def exposition(self) -> bytes:
        """The text exposition format (what `/metrics` serves)."""
        return generate_latest(self.registry)
