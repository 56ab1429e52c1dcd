"""The meterd daemon: links, buses, plans, journal, sinks and the ops surface (asyncio)."""
