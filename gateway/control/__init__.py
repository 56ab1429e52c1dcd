"""Prepaid control: trip and reconnect commands that are persisted, guarded, serialized and verified."""
