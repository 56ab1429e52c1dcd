"""How the daemon's process runs: which event loop, and how the garbage collector is set.

`meterd run` and bench/scale.py both use these helpers, so the bench measures what the daemon does.

Event loop: uvloop (libuv, the optional extra "fast") when it is importable, else asyncio's own.
Its transports and `call_soon` are in C; the daemon's work per bus transaction is mostly those.

Garbage collector: collection creates no reference cycles worth finding quickly, but a round of
10,000 meters keeps tens of thousands of young objects (tasks, coroutines, futures) alive for the
whole round. With the default gen-0 threshold of 700 allocations they are traversed again and
again, and the start-up heap (modules, configuration, the meter archive) on every full collection.
`tune_gc` therefore freezes what exists at start-up (full collections skip it for good) and raises
the gen-0 threshold, so a collection runs per tens of thousands of allocations, not per hundreds;
memory stays bounded because gen 0 still collects, only less often.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")
LoopKind = Literal["auto", "asyncio", "uvloop"]
GEN0_THRESHOLD = 20_000  # allocations between young collections (CPython's default: 700)


def tune_gc(gen0: int | None = GEN0_THRESHOLD) -> None:
    """Freeze the heap that exists now (call once start-up objects exist) and raise the gen-0 threshold.

    `gen0=None` only freezes. Frozen objects are never collected: call it before the work starts,
    not in a loop."""
    gc.collect()
    gc.freeze()
    if gen0 is not None:
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(gen0, gen1, gen2)


def loop_factory(kind: LoopKind = "auto") -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop factory for `kind`; None means asyncio's default loop.

    "auto": uvloop when it is installed; "uvloop": ImportError when it is not."""
    if kind == "asyncio":
        return None
    try:
        import uvloop  # noqa: PLC0415  (optional: the extra "fast")
    except ImportError:
        if kind == "uvloop":
            raise
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def loop_name(kind: LoopKind = "auto") -> str:
    """"uvloop" or "asyncio": what `run(kind=...)` will use."""
    return "asyncio" if loop_factory(kind) is None else "uvloop"


def new_event_loop(kind: LoopKind = "auto") -> asyncio.AbstractEventLoop:
    factory = loop_factory(kind)
    return asyncio.new_event_loop() if factory is None else factory()


def run(main: Coroutine[Any, Any, T], *, loop: LoopKind = "auto") -> T:
    """`asyncio.run(main)` on the loop `loop` names."""
    with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
        return runner.run(main)
