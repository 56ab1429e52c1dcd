"""`meterd run`: assemble the daemon from its config and keep it running.

Order matters: the journal opens first (nothing is collected that cannot be
stored), links and buses start, the API and sinks follow, then systemd is
told READY and the scheduler starts. SIGTERM stops in reverse, except that
each sink first gets its `drain_on_stop` to send what it still has; SIGHUP
reloads the config, restarting only the links, buses and plans that changed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from gateway import sdnotify
from gateway.api import ApiServer
from gateway.api_read import read_routes
from gateway.archive import MeterConfig
from gateway.bus import Bus, Timing
from gateway.clock import ClockWatch
from gateway.config import Config, ConfigError, load_config
from gateway.control.api import control_routes
from gateway.control.inbox import Inbox, command_handler
from gateway.control.service import Control
from gateway.journal import Journal
from gateway.links import Link, Listener, build_link
from gateway.links.config import LinkConfig
from gateway.logs import MeterLog, trace_logger
from gateway.model import Outcome, Reading, Reason, RoundStats
from gateway.prepaid.policy import Prepaid
from gateway.prepaid.routes import accounts_routes, payment_handler
from gateway.reader import Dlt645Reader
from gateway.reload import apply
from gateway.scheduler import Scheduler
from gateway.sinks import Sink, SinkConfig, build_sink
from gateway.stats import CollectionStats
from gateway.supervisor import Supervisor

log = logging.getLogger(__name__)
DRAIN_POLL = 0.1  # s between backlog counts while sinks drain at stop


class Observer:
    """Fans round events out to the statistics and the de-duplicated per-meter log."""

    def __init__(self, stats: CollectionStats, meter_log: MeterLog,
                 readers: tuple[Callable[[list[Reading]], None], ...] = ()) -> None:
        self.stats = stats
        self.meter_log = meter_log
        self.readers = readers  # control and prepaid look at every journaled reading (relay state, energy)

    def round_started(self, stats: RoundStats) -> None:
        self.stats.round_started(stats)

    def outcome(self, round_id: str, outcome: Outcome, *, plan: str, link: str, area: str) -> None:
        self.stats.outcome(round_id, outcome, plan=plan, link=link, area=area)
        if outcome.readings:
            for observe in self.readers:
                observe(outcome.readings)
        if outcome.ok:
            self.meter_log.success(outcome.meter)
        elif outcome.reason is not Reason.BUSY:  # a skipped job says nothing about the meter
            self.meter_log.failure(outcome.meter, str(outcome.reason), outcome.detail)

    def round_finished(self, stats: RoundStats) -> None:
        self.stats.round_finished(stats)


class Daemon:
    """The running daemon. Every link, bus, sink and the scheduler is a named part with its own
    stop event, so a reload can restart exactly the parts whose configuration changed."""

    def __init__(self, config: Config, config_path: Path) -> None:
        self.config = config
        self.config_path = config_path
        self.stop = asyncio.Event()
        self.supervisor = Supervisor(self.stop)
        self.journal = Journal(config.station.state_dir / "journal.sqlite", config.journal)
        degrade = min((link.degrade_after for link in config.links), default=3)
        self.stats = CollectionStats(config.station.name, config.tz, degraded_after=degrade)
        self.meter_log = MeterLog()
        self.links: dict[str, Link | Listener] = {}
        self.buses: dict[str, Bus] = {}
        self.sinks: dict[str, Sink[Any]] = {}
        self._parts: dict[str, asyncio.Event] = {}
        self.api: ApiServer | None = None
        self.clock_watch = ClockWatch(lambda: self.config, self.bus_for, self.timing_for)
        # one reader for the daemon's life: its memory of meters that refuse block reads survives reloads
        self.reader = Dlt645Reader(config.station.name, config.tz, self.timing_for)
        self.control = Control(config.control, self.journal, station=config.station.name, tz=config.tz,
                               meter_for=self.meter_for, bus_for=self.bus_for, timing_for=self.timing_for)
        self.prepaid = Prepaid(config.prepaid, self.journal, self.control, station=config.station.name,
                               meters=self.meter_for) if config.prepaid.enabled else None

    # --- parts --------------------------------------------------------------------------------
    def _start(self, part: str, factory: Callable[[asyncio.Event], Awaitable[None]], *,
               with_daemon: bool = True) -> None:
        """Run a part under supervision with its own stop event: set by `end_part`, and by the daemon's
        stop unless `with_daemon` is False (sinks: the daemon ends them after their drain)."""
        own = asyncio.Event()
        self._parts[part] = own

        async def until_stopped() -> None:
            stopper = asyncio.create_task(self.stop.wait())
            if with_daemon:
                stopper.add_done_callback(lambda _: own.set())
            try:
                await factory(own)
            finally:
                stopper.cancel()

        self.supervisor.spawn(part, until_stopped)

    def end_part(self, part: str) -> None:
        event = self._parts.pop(part, None)
        if event is not None:
            event.set()

    # --- links and buses ------------------------------------------------------------------------
    def meter_for(self, address: str) -> MeterConfig | None:
        return self.config.meter(address)

    def timing_for(self, meter: MeterConfig) -> Timing:
        base = self.bus_for(meter)
        timing = base.timing if base else Timing()
        return Timing(meter.first_byte_timeout or timing.first_byte, meter.inter_byte_timeout or timing.inter_byte,
                      timing.gap, timing.retries, timing.preamble)

    def bus_for(self, meter: MeterConfig) -> Bus | None:
        link = self.links.get(meter.link)
        if isinstance(link, Listener):
            key = f"{meter.link}/{meter.peer or meter.address}"
            bus = self.buses.get(key)
            if bus is None:
                bus = self.buses[key] = self._make_bus(meter.link, link.peer(meter.peer or meter.address))
                self._start(f"bus:{key}", bus.run)
            return bus
        return self.buses.get(meter.link)

    def _make_bus(self, name: str, link: Link) -> Bus:
        cfg = self.config.link(name)
        timing = Timing(cfg.first_byte_timeout_s, cfg.inter_byte_timeout_s, cfg.gap, cfg.retries, cfg.preamble)
        link.on_state = self.stats.link_state
        self.stats.link_state(link.name, link.up, link.detail)  # a DTU may have dialled in before its bus existed
        return Bus(link, timing, degrade_after=cfg.degrade_after, trace=trace_logger(link.name) if cfg.trace else None)

    def start_link(self, cfg: LinkConfig) -> None:
        link = build_link(cfg)
        link.on_state = self.stats.link_state
        self.links[cfg.name] = link
        self._start(f"link:{cfg.name}", link.run)
        if isinstance(link, Listener):  # one bus per peer its meters name, so their DTUs are expected
            for meter in self.config.meters:
                if meter.link == cfg.name:
                    self.bus_for(meter)
        else:
            bus = self.buses[cfg.name] = self._make_bus(cfg.name, link)
            self._start(f"bus:{cfg.name}", bus.run)

    def stop_link(self, name: str) -> None:
        self.links.pop(name, None)
        self.end_part(f"link:{name}")
        for key in [k for k in self.buses if k == name or k.startswith(name + "/")]:
            self.buses.pop(key)
            self.end_part(f"bus:{key}")

    def links_up(self) -> int:
        up = 0
        for link in self.links.values():
            if isinstance(link, Listener):
                up += sum(1 for peer in link.peers().values() if peer.up)
            elif link.up:
                up += 1
        return up

    def start_sink(self, cfg: SinkConfig) -> None:
        sink = build_sink(cfg, self.config.station.name)
        self.sinks[cfg.name] = sink
        self._start(f"sink:{cfg.name}", lambda own: sink.run(self.journal, own), with_daemon=False)

    async def drain_sinks(self) -> None:
        """Stopping: each sink gets its `drain_on_stop` to send its backlog, then ends. What is left
        stays in the journal and goes out on the next start (nothing is lost either way)."""
        async def drain(name: str, sink: Sink[Any]) -> None:
            started = loop.time()
            if sink.settings.drain_on_stop > 0:
                sink.wake()  # out of an idle pause: send now
            try:
                left = await self.journal.backlog(sink.cursor)
                while left and loop.time() - started < sink.settings.drain_on_stop:
                    await asyncio.sleep(DRAIN_POLL)
                    left = await self.journal.backlog(sink.cursor)
            except Exception as exc:  # the journal failing must not keep the daemon from stopping
                left = -1
                log.warning("stopping: sink %s: cannot count its backlog (%s)", name, exc)
            finally:
                self.end_part(f"sink:{name}")
            if left > 0:
                log.warning("stopping: sink %s still has %d readings to send; they go out on the next start",
                            name, left)

        loop = asyncio.get_running_loop()
        await asyncio.gather(*(drain(name, sink) for name, sink in self.sinks.items()))

    def start_scheduler(self) -> None:
        config = self.config
        reader = self.reader
        scheduler = Scheduler(config.plans, {p.name: config.plan_meters(p) for p in config.plans},
                              bus_for=self.bus_for, reader=reader, journal=self.journal,
                              observer=self.observer(), station=config.station.name, tz=config.tz)
        self._start("scheduler", scheduler.run)

    def observer(self) -> Observer:
        readers: list[Callable[[list[Reading]], None]] = [self.control.observe]
        if self.prepaid is not None:
            readers.append(self.prepaid.observe)
        return Observer(self.stats, self.meter_log, tuple(readers))

    async def start_control(self, api: ApiServer) -> None:
        """Commands resume before anything else talks on the buses; prepaid follows control."""
        await self.control.start()
        self._start("control", self.control.run)
        api.add_routes(control_routes(self.control))
        inbox = Inbox(self.config.control.mqtt, self.config.station.name) if self.config.control.mqtt else None
        if inbox is not None:
            inbox.route("meters/+/commands", command_handler(self.control))
        if self.prepaid is not None:
            await self.prepaid.start()
            self._start("prepaid", self.prepaid.run)
            api.add_routes(accounts_routes(self.prepaid))
            api.add_section("prepaid", self.prepaid.status)
            if inbox is not None:
                inbox.route("accounts/+/payments", payment_handler(self.prepaid))
        if inbox is not None:
            api.add_section("inbox", lambda: dict(inbox.counters))
            self._start("inbox", inbox.run)

    # --- lifecycle ------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        loop.add_signal_handler(signal.SIGINT, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.journal.open()
        try:
            for link_cfg in self.config.links:
                self.start_link(link_cfg)
            self.api = ApiServer(self.config.api, self.stats, journal_ok=lambda: self.journal.alive,
                                 links_up=self.links_up, extra={"journal": lambda: dict(self.journal.stats),
                                                                "sinks": self.sink_status,
                                                                "clock": self.clock_watch.status,
                                                                "control": lambda: dict(self.control.counters)})
            await self.start_control(self.api)
            self.api.add_routes(read_routes(lambda: self.config, self.bus_for, Dlt645Reader(
                self.config.station.name, self.config.tz, self.timing_for)))
            self._register_metrics(self.api)
            await self.api.start()
            for sink_cfg in self.config.sinks:
                self.start_sink(sink_cfg)
            self.supervisor.spawn("retention", lambda: self.journal.run_retention(self.stop))
            self.start_scheduler()
            self._start("clock", self.clock_watch.run)
            self.supervisor.spawn("watchdog", lambda: sdnotify.watchdog(self.stop))
            sdnotify.ready()
            log.info("meterd %s running: %d links, %d meters, %d plans, %d sinks", self.config.station.name,
                     len(self.links), len(self.config.meters), len(self.config.plans), len(self.config.sinks))
            await self.stop.wait()
            sdnotify.stopping()
            await self.drain_sinks()
            await self.supervisor.shutdown()
            await self.api.stop()
        finally:
            await self.journal.close()
        return 0

    def sink_status(self) -> dict[str, object]:
        return {name: dict(sink.counters) for name, sink in self.sinks.items()}

    def _register_metrics(self, api: ApiServer) -> None:
        m = api.metrics
        m.register_gauge_callback("meterd_journal_appended", "readings committed to the journal", (),
                                  lambda: float(self.journal.stats.get("appended", 0)), kind="counter")
        m.register_gauge_callback("meterd_journal_dropped", "readings dropped by retention", ("why",), lambda: {
            (k.removeprefix("dropped_"),): float(v) for k, v in self.journal.stats.items() if k.startswith("dropped_")})
        m.register_gauge_callback("meterd_sink_backlog", "journal entries a sink has not forwarded", ("sink",),
                                  lambda: {(n, ): float(s.counters["backlog"]) for n, s in self.sinks.items()})
        m.register_gauge_callback("meterd_sink_dropped", "lines a sink dropped (rejected by the server)", ("sink",),
                                  lambda: {(n, ): float(s.counters["dropped_lines"]) for n, s in self.sinks.items()},
                                  kind="counter")
        m.register_gauge_callback("meterd_sink_sent", "lines a sink delivered", ("sink",),
                                  lambda: {(n, ): float(s.counters["sent_lines"]) for n, s in self.sinks.items()},
                                  kind="counter")
        m.register_gauge_callback("meterd_control_events", "control command counters (submitted, verified...)",
                                  ("event",), lambda: {(k,): float(v) for k, v in self.control.counters.items()},
                                  kind="counter")
        m.register_gauge_callback("meterd_reader_events", "block reads merged from single items, and fallbacks",
                                  ("event",), lambda: {(k,): float(v) for k, v in self.reader.stats.items()},
                                  kind="counter")
        m.register_gauge_callback("meterd_control_open", "control commands not finished yet", (),
                                  lambda: float(len(self.control.ledger.open)))

    def reload(self) -> None:
        """SIGHUP: validate the new file, then restart only what changed; a bad file changes nothing."""
        try:
            fresh = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config:\n%s", exc)
            return
        sdnotify.reloading()
        changes = apply(self, fresh)
        sdnotify.ready()
        log.info("reloaded %s: %s", self.config_path, ", ".join(changes) or "nothing changed")
