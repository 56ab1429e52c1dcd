"""Links: the pipes between the daemon and its meters (serial, TCP client, TCP listener peers, MQTT).

Every link keeps itself connected inside `run(stop)` and says when it is up
or down; the bus (one per link) sends requests and reads replies
through it. See `base` for the contract and `config` for how links are
configured and built.
"""

from gateway.links.base import Backoff, Link, LinkDown, Reconnecting
from gateway.links.config import (
    LINK_CONFIG,
    LinkConfig,
    LinkSettings,
    ListenConfig,
    MqttConfig,
    RegistrationConfig,
    RegistrationRule,
    SerialConfig,
    TcpConfig,
    build_link,
    parse_link,
    parse_pattern,
)
from gateway.links.listener import Listener, PeerLink
from gateway.links.mqtt import MqttLink
from gateway.links.serial import SerialLink, is_pty
from gateway.links.tcp import TcpLink

__all__ = [
    "LINK_CONFIG",
    "Backoff",
    "Link",
    "LinkConfig",
    "LinkDown",
    "LinkSettings",
    "ListenConfig",
    "Listener",
    "MqttConfig",
    "MqttLink",
    "PeerLink",
    "Reconnecting",
    "RegistrationConfig",
    "RegistrationRule",
    "SerialConfig",
    "SerialLink",
    "TcpConfig",
    "TcpLink",
    "build_link",
    "is_pty",
    "parse_link",
    "parse_pattern",
]
