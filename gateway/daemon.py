"""`meterd run`: assemble the daemon from its config and keep it running.

Order matters: the journal opens first (nothing is collected that cannot be
stored), links and buses start, the API and sinks follow, then systemd is
told READY and the scheduler starts. SIGTERM stops in reverse; SIGHUP
reloads the config, restarting only the links, buses and plans that changed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from pathlib import Path

from gateway import sdnotify
from gateway.api import ApiServer
from gateway.archive import MeterConfig
from gateway.bus import Bus, Timing
from gateway.config import Config, ConfigError, load_config
from gateway.journal import Journal
from gateway.links import Link, Listener, build_link
from gateway.logs import MeterLog, trace_logger
from gateway.model import Outcome, Reason, RoundStats
from gateway.reader import Dlt645Reader
from gateway.scheduler import Scheduler
from gateway.sinks import build_sink
from gateway.stats import CollectionStats
from gateway.supervisor import Supervisor

log = logging.getLogger(__name__)


class Observer:
    """Fans round events out to the statistics and the de-duplicated per-meter log."""

    def __init__(self, stats: CollectionStats, meter_log: MeterLog) -> None:
        self.stats = stats
        self.meter_log = meter_log

    def round_started(self, stats: RoundStats) -> None:
        self.stats.round_started(stats)

    def outcome(self, round_id: str, outcome: Outcome, *, plan: str, link: str, area: str) -> None:
        self.stats.outcome(round_id, outcome, plan=plan, link=link, area=area)
        if outcome.ok:
            self.meter_log.success(outcome.meter)
        elif outcome.reason is not Reason.BUSY:  # a skipped job says nothing about the meter
            self.meter_log.failure(outcome.meter, str(outcome.reason), outcome.detail)

    def round_finished(self, stats: RoundStats) -> None:
        self.stats.round_finished(stats)


class Daemon:
    def __init__(self, config: Config, config_path: Path) -> None:
        self.config = config
        self.config_path = config_path
        self.stop = asyncio.Event()
        self.supervisor = Supervisor(self.stop)
        self.journal = Journal(config.station.state_dir / "journal.sqlite", config.journal)
        degrade = min((link.degrade_after for link in config.links), default=3)
        self.stats = CollectionStats(config.station.name, config.tz, degraded_after=degrade)
        self.links: dict[str, Link | Listener] = {}
        self.buses: dict[str, Bus] = {}
        self.started = time.time()

    # --- links and buses ------------------------------------------------------------------------
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
                bus = self._make_bus(meter.link, link.peer(meter.peer or meter.address))
                self.buses[key] = bus
                self.supervisor.spawn(f"bus-{key}", lambda b=bus: b.run(self.stop))  # type: ignore[misc]
            return bus
        return self.buses.get(meter.link)

    def _make_bus(self, name: str, link: Link) -> Bus:
        cfg = self.config.link(name)
        timing = Timing(cfg.first_byte_timeout_s, cfg.inter_byte_timeout_s, cfg.gap, cfg.retries, cfg.preamble)
        link.on_state = self.stats.link_state
        return Bus(link, timing, degrade_after=cfg.degrade_after, trace=trace_logger(link.name) if cfg.trace else None)

    def start_links(self) -> None:
        for cfg in self.config.links:
            link = build_link(cfg)
            self.links[cfg.name] = link
            self.supervisor.spawn(f"link-{cfg.name}", lambda lk=link: lk.run(self.stop))  # type: ignore[misc]
            if isinstance(link, Listener):
                continue
            bus = self._make_bus(cfg.name, link)
            self.buses[cfg.name] = bus
            self.supervisor.spawn(f"bus-{cfg.name}", lambda b=bus: b.run(self.stop))  # type: ignore[misc]

    def links_up(self) -> int:
        up = 0
        for link in self.links.values():
            if isinstance(link, Listener):
                up += sum(1 for peer in link.peers().values() if peer.up)
            elif link.up:
                up += 1
        return up

    # --- lifecycle ------------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop.set)
        loop.add_signal_handler(signal.SIGINT, self.stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.journal.open()
        try:
            self.start_links()
            api = ApiServer(self.config.api, self.stats, journal_ok=lambda: self.journal.alive,
                            links_up=self.links_up, extra={"journal": lambda: dict(self.journal.stats)})
            await api.start()
            for sink_cfg in self.config.sinks:
                sink = build_sink(sink_cfg, self.config.station.name)
                self.supervisor.spawn(f"sink-{sink.name}", lambda s=sink: s.run(self.journal, self.stop))  # type: ignore[misc]
            self.supervisor.spawn("retention", lambda: self.journal.run_retention(self.stop))
            meter_log = MeterLog()
            scheduler = Scheduler(self.config.plans, {p.name: self.config.plan_meters(p) for p in self.config.plans},
                                  bus_for=self.bus_for, reader=Dlt645Reader(self.config.station.name, self.config.tz,
                                                                            self.timing_for),
                                  journal=self.journal, observer=Observer(self.stats, meter_log),
                                  station=self.config.station.name, tz=self.config.tz)
            self.supervisor.spawn("scheduler", lambda: scheduler.run(self.stop))
            self.supervisor.spawn("watchdog", lambda: sdnotify.watchdog(self.stop))
            sdnotify.ready()
            log.info("meterd %s running: %d links, %d meters, %d plans, %d sinks", self.config.station.name,
                     len(self.links), len(self.config.meters), len(self.config.plans), len(self.config.sinks))
            await self.stop.wait()
            sdnotify.stopping()
            await self.supervisor.shutdown()
            await api.stop()
        finally:
            await self.journal.close()
        return 0

    def reload(self) -> None:
        try:
            fresh = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload refused, keeping the running config:\n%s", exc)
            return
        log.warning("SIGHUP: config reload is applied on restart in this version (%d meters in the new file)",
                    len(fresh.meters))
