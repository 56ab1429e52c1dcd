"""SIGHUP: the difference between the running config and the new one, applied part by part.

Links whose table is unchanged keep their connection and their bus; a
changed link restarts; meters and plans are re-read by a fresh scheduler
(their rounds restart, their statistics and degradation state stay); sinks
restart only if their table changed (their journal cursors keep them
exactly-once across the restart).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.config import Config

if TYPE_CHECKING:
    from gateway.daemon import Daemon


def apply(daemon: Daemon, fresh: Config) -> list[str]:
    old = daemon.config
    changes: list[str] = []
    if fresh.station != old.station or fresh.journal != old.journal or fresh.api.listen != old.api.listen:
        changes.append("station/journal/api listen changes need a restart (ignored)")
        fresh = fresh.model_copy(update={"station": old.station, "journal": old.journal,
                                         "api": old.api.model_copy(update={"token": fresh.api.token,
                                                                           "token_file": fresh.api.token_file})})
    if fresh.control != old.control or fresh.prepaid != old.prepaid:
        changes.append("control/prepaid changes need a restart (ignored)")
        fresh = fresh.model_copy(update={"control": old.control, "prepaid": old.prepaid})
    old_links = {link.name: link for link in old.links}
    new_links = {link.name: link for link in fresh.links}
    daemon.config = fresh
    for name, cfg in old_links.items():
        if new_links.get(name) != cfg:
            daemon.stop_link(name)
            changes.append(f"link {name} {'restarted' if name in new_links else 'removed'}")
    for name, cfg in new_links.items():
        if old_links.get(name) != cfg:
            daemon.start_link(cfg)
            if name not in old_links:
                changes.append(f"link {name} added")
    old_sinks = {s.name: s for s in old.sinks}
    new_sinks = {s.name: s for s in fresh.sinks}
    for name, sink_cfg in old_sinks.items():
        if new_sinks.get(name) != sink_cfg:
            daemon.sinks.pop(name, None)
            daemon.end_part(f"sink:{name}")
            changes.append(f"sink {name} {'restarted' if name in new_sinks else 'removed'}")
    for name, sink_cfg in new_sinks.items():
        if old_sinks.get(name) != sink_cfg:
            daemon.start_sink(sink_cfg)
            if name not in old_sinks:
                changes.append(f"sink {name} added")
    removed = {m.address for m in old.meters} - {m.address for m in fresh.meters}
    for address in removed:
        daemon.stats.forget(address)
        daemon.meter_log.forget(address)
    if fresh.meters != old.meters or fresh.plans != old.plans or any(c.startswith("link") for c in changes):
        daemon.end_part("scheduler")
        daemon.start_scheduler()
        changes.append(f"plans/meters reloaded ({len(fresh.meters)} meters, {len(fresh.plans)} plans"
                       + (f", {len(removed)} removed" if removed else "") + ")")
    if daemon.api is not None and fresh.api.token != old.api.token:
        daemon.api.set_token(fresh.api.token)
        changes.append("api token")
    return changes
