"""Sinks: forward journal entries to InfluxDB and MQTT, each with its own cursor.

`build_sink(config)` turns one validated `[[sinks]]` table into a sink; `await
sink.run(journal, stop)` forwards until `stop` is set. `sink.counters` is what ops sees.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from gateway.sinks.base import Journal, Sink, SinkCounters, SinkSettings, Verdict, WriteFailure, classify
from gateway.sinks.influx import InfluxSink, InfluxSinkConfig
from gateway.sinks.mqtt import MqttSink, MqttSinkConfig

SinkConfig = Annotated[InfluxSinkConfig | MqttSinkConfig, Field(discriminator="kind")]

__all__ = [
    "InfluxSink",
    "InfluxSinkConfig",
    "Journal",
    "MqttSink",
    "MqttSinkConfig",
    "Sink",
    "SinkConfig",
    "SinkCounters",
    "SinkSettings",
    "Verdict",
    "WriteFailure",
    "build_sink",
    "classify",
]


def build_sink(config: InfluxSinkConfig | MqttSinkConfig, station: str = "") -> InfluxSink | MqttSink:
    """One configured sink; `station` is the daemon's (MQTT topics when the sink names none).

    No network I/O happens before `run()`."""
    if isinstance(config, InfluxSinkConfig):
        return InfluxSink(config, station)
    return MqttSink(config, station)
