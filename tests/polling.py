"""Waiting in async tests for something another process or task makes true: polled, never assumed
from elapsed time, with a generous bound so that a loaded CI box only waits longer."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

POLL_S = 0.05


async def until(
    check: Callable[[], bool | Awaitable[bool]], timeout_s: float = 30.0, what: str = "condition"
) -> None:
    """Poll `check` (a function or a coroutine function) until it holds; fail naming `what` after
    `timeout_s`."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert asyncio.get_running_loop().time() < deadline, f"{what} not met within {timeout_s} s"
        await asyncio.sleep(POLL_S)
