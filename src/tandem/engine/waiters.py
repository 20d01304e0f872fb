"""Wait-until-woken lists: the one primitive behind the engine's fast paths.

Hot paths (every write) check a counter or a list and go on; only a caller
that really has to wait parks a future in a list, and whoever changes the
state wakes the whole list. Cheaper than asyncio.Condition, which takes a
lock and creates a future on every notify, waiting or not.
"""

from __future__ import annotations

import asyncio
import contextlib


async def wait(waiters: list[asyncio.Future]) -> None:
    """Park until `wake_all(waiters)`; the caller re-checks its condition after."""
    fut = asyncio.get_running_loop().create_future()
    waiters.append(fut)
    try:
        await fut
    finally:
        with contextlib.suppress(ValueError):    # woken futures are already gone
            waiters.remove(fut)


def wake_all(waiters: list[asyncio.Future]) -> None:
    """Resolve and forget every future in the list."""
    if not waiters:
        return
    pending = waiters[:]
    waiters.clear()
    for fut in pending:
        if not fut.done():
            fut.set_result(None)
