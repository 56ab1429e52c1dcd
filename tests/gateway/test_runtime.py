"""The daemon's runtime: the loop `meterd run` picks and the GC settings it applies once started."""

from __future__ import annotations

import asyncio
import gc
import importlib.util
from collections.abc import Iterator

import pytest

from gateway import runtime


@pytest.fixture
def gc_restored() -> Iterator[None]:
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


def test_tune_gc_freezes_the_start_up_heap_and_raises_gen0(gc_restored: None) -> None:
    gc.unfreeze()
    start_up = [object() for _ in range(10)]
    runtime.tune_gc()
    assert gc.get_freeze_count() >= len(start_up)
    assert gc.get_threshold()[0] == runtime.GEN0_THRESHOLD
    runtime.tune_gc(None)  # freeze only: the threshold stays as it is
    assert gc.get_threshold()[0] == runtime.GEN0_THRESHOLD


async def loop_type() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def test_asyncio_loop_on_request() -> None:
    assert runtime.loop_factory("asyncio") is None
    assert runtime.run(loop_type(), loop="asyncio") == "asyncio"
    assert runtime.loop_name("asyncio") == "asyncio"


def test_auto_picks_uvloop_exactly_when_it_is_installed() -> None:
    installed = importlib.util.find_spec("uvloop") is not None
    expected = "uvloop" if installed else "asyncio"
    assert runtime.loop_name("auto") == expected
    assert runtime.run(loop_type()) == expected
    loop = runtime.new_event_loop()
    try:
        assert type(loop).__module__.split(".")[0] == expected
    finally:
        loop.close()
