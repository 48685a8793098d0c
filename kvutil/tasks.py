"""Stopping background tasks within a bound: `cancel_and_wait`, and `wait_for_bounded` for the last
awaits of a stop path (a final flush, a close).

Pure asyncio, no I/O. The engines and the gateway both stop their tasks this way; it lives in kvutil,
which both may import, because it is not routing.

Why not `task.cancel(); await task`: a cancel can be lost (on Python 3.11, `asyncio.wait_for`, which
nats-py uses for flushes and requests, returns the inner result when it completes as the cancel
arrives), and the task, often a `while True` loop, runs on and is awaited forever. Why not
`asyncio.wait_for(task, t)`: on timeout it cancels the task and then awaits it without a bound, and a
cancel of the caller that arrives as the task completes is lost (3.11).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterable
from typing import Any, TypeVar

log = logging.getLogger("kvgate.tasks")

T = TypeVar("T")

CANCEL_GRACE_S = 0.5  # what wait_for_bounded gives a timed-out coroutine to finish its cancel


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]], timeout: float) -> list[asyncio.Task[Any]]:
    """Cancel `tasks` and wait at most `timeout` seconds for them to finish.

    Returns the tasks still running at the bound, in the given order, and logs their names. Those
    still running halfway through are cancelled once more (their first cancel may have been lost).
    The tasks' results, exceptions and CancelledError never reach the caller; their exceptions are
    retrieved and logged (also for a task that finishes after the bound), so asyncio does not warn
    "exception was never retrieved". Cancelling the caller while it waits raises CancelledError in
    the caller as usual; the tasks stay cancelled. The calling task itself is skipped, so a task may
    stop a group it belongs to.
    """
    if timeout < 0:
        raise ValueError(f"timeout must be >= 0, got {timeout}")
    current = asyncio.current_task()
    group = list(dict.fromkeys(task for task in tasks if task is not current))
    for task in group:
        task.add_done_callback(_retrieve)
        task.cancel()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    await _wait(group, timeout / 2)
    for task in group:
        if not task.done():
            task.cancel()
    await _wait(group, deadline - loop.time())
    stragglers = [task for task in group if not task.done()]
    if stragglers:
        log.warning(
            "%d task(s) still running %.1f s after being cancelled: %s",
            len(stragglers),
            timeout,
            ", ".join(_name(task) for task in stragglers),
        )
    return stragglers


async def wait_for_bounded(
    coro: Coroutine[Any, Any, T], timeout: float, *, name: str, grace: float = CANCEL_GRACE_S
) -> T:
    """`asyncio.wait_for` with a hard bound: returns the result or raises the coroutine's exception
    (RuntimeError if something else cancelled it). Past `timeout` it is cancelled through
    `cancel_and_wait` (at most `grace` more seconds, then left to finish on its own, logged under
    `name`) and TimeoutError is raised. Cancelling the caller cancels the coroutine and raises
    CancelledError in the caller."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    try:
        await _wait([task], timeout)
    except asyncio.CancelledError:
        task.add_done_callback(_retrieve)
        task.cancel()
        raise
    if task.cancelled():  # by someone else: not the caller's cancellation, so not its CancelledError
        raise RuntimeError(f"{name} was cancelled")
    if task.done():
        return task.result()
    await cancel_and_wait([task], grace)
    raise TimeoutError(f"{name} did not finish within {timeout} s")


async def _wait(tasks: list[asyncio.Task[Any]], timeout: float) -> None:
    running = [task for task in tasks if not task.done()]
    if running:
        await asyncio.wait(running, timeout=max(timeout, 0.0))


def _retrieve(task: asyncio.Future[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        log.warning("task %s ended with %s: %s", _name(task), type(exc).__name__, exc)


def _name(task: asyncio.Future[Any]) -> str:
    # a plain future (what asyncio.ensure_future gives for some awaitables) has no name
    return task.get_name() if isinstance(task, asyncio.Task) else repr(task)
