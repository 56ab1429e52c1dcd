"""metersim: software DL/T 645 meters, buses and DTUs for tests and test rigs (asyncio)."""
