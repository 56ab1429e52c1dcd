"""Shared pytest setup. Server fixtures (mosquitto, influxdb, victoriametrics, free_port,
unique_topic) live in tests/services.py."""

pytest_plugins = ["tests.services"]
