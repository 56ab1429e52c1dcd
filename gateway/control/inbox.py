"""Commands and payments that arrive over MQTT (placeholder: the interfaces engineer builds it)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class InboxConfig(BaseModel):
    """`[control.mqtt]`: the broker the inbound topics are subscribed on."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: str = "mqtt://127.0.0.1:1883"
    client_id: str = ""
    username: str | None = None
    password: str | None = None
