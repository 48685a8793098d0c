"""Per-worker in-flight limits and, when every worker is saturated, a bounded queue by session.

The queue favours sessions in the middle of a tool loop, then those with the least attained service
(tokens served so far), then arrival order, so one long agent does not starve the rest
(docs/ARCHITECTURE.md, "agent-session-aware" point 6). A slot is handed to a waiter by routing it at
that moment, so a fresh request cannot take the slot between the release and the waiter waking up.

Before that, a turn may wait for the router itself (`gateway.router_holds`).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections import OrderedDict
from collections.abc import Callable

from router.request import Decision

# Given the workers that must not be chosen (saturated), route the request or say None.
RouteFn = Callable[[frozenset[str]], Decision | None]


class QueueFull(Exception):
    """Every worker is saturated and the queue is at its bound (answered 429)."""


class NoWorker(Exception):
    """No worker can serve the request at all (answered 503)."""


class _Waiter:
    __slots__ = ("eligible", "future", "route")

    def __init__(self, route: RouteFn, eligible: frozenset[str], future: asyncio.Future[Decision]) -> None:
        self.route = route
        self.eligible = eligible
        self.future = future


class Admission:
    def __init__(
        self, queue_bound: int = 256, queue_timeout_s: float = 30.0, max_sessions: int = 10_000
    ) -> None:
        self.queue_bound = queue_bound
        self.queue_timeout_s = queue_timeout_s
        self.max_sessions = max_sessions
        self._limits: dict[str, int] = {}
        self._inflight: dict[str, int] = {}
        self._heap: list[tuple[int, int, int, _Waiter]] = []
        self._order = itertools.count()
        self._service: OrderedDict[str, int] = OrderedDict()  # session -> attained tokens

    # --- workers

    def set_limit(self, worker_id: str, limit: int) -> None:
        self._limits[worker_id] = max(1, limit)
        self._inflight.setdefault(worker_id, 0)
        self._dispatch()

    def remove_worker(self, worker_id: str) -> None:
        self._limits.pop(worker_id, None)
        self._inflight.pop(worker_id, None)
        self._dispatch()  # waiters that only it could serve fail now

    def inflight(self, worker_id: str) -> int:
        return self._inflight.get(worker_id, 0)

    @property
    def queued(self) -> int:
        return sum(1 for *_, w in self._heap if not w.future.done())

    # --- requests

    async def admit(
        self, route: RouteFn, eligible: frozenset[str], session_id: str, in_tool_loop: bool
    ) -> Decision:
        """A decision whose worker slot is taken; raises QueueFull, NoWorker or TimeoutError.

        `eligible`: the workers that can serve the request (its model); `route` is called only when
        one of them has a free slot, with the others excluded.
        """
        if not eligible & self._limits.keys():
            raise NoWorker
        if not self._heap:
            decision = self._try(route, eligible)
            if decision is not None:
                return decision
        if len(self._heap) >= self.queue_bound:
            raise QueueFull
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        key = (0 if in_tool_loop else 1, self._service.get(session_id, 0), next(self._order))
        heapq.heappush(self._heap, (*key, _Waiter(route, eligible, future)))
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.queue_timeout_s)
        except (TimeoutError, asyncio.CancelledError):
            if future.done() and not future.cancelled() and future.exception() is None:
                self.release(future.result().worker_id)  # the slot came just as we gave up
            future.cancel()
            self._prune()
            raise

    def _try(self, route: RouteFn, eligible: frozenset[str]) -> Decision | None:
        free = {w for w in eligible & self._limits.keys() if self._inflight[w] < self._limits[w]}
        if not free:
            return None
        decision = route(frozenset(self._limits.keys() - free))
        if decision is None or decision.worker_id not in self._limits:
            return None
        self._inflight[decision.worker_id] += 1
        return decision

    def release(self, worker_id: str) -> None:
        if worker_id in self._inflight and self._inflight[worker_id] > 0:
            self._inflight[worker_id] -= 1
        self._dispatch()

    def _dispatch(self) -> None:
        while self._heap:
            waiter = self._heap[0][-1]
            if waiter.future.done():
                heapq.heappop(self._heap)
                continue
            if not waiter.eligible & self._limits.keys():
                heapq.heappop(self._heap)  # its workers are gone: let it fail now, not at its timeout
                waiter.future.set_exception(NoWorker())
                continue
            decision = self._try(waiter.route, waiter.eligible)
            if decision is None:
                return
            heapq.heappop(self._heap)
            waiter.future.set_result(decision)

    def _prune(self) -> None:
        self._heap = [entry for entry in self._heap if not entry[-1].future.done()]
        heapq.heapify(self._heap)

    def add_service(self, session_id: str, tokens: int) -> None:
        self._service[session_id] = self._service.pop(session_id, 0) + tokens
        if len(self._service) > self.max_sessions:
            self._service.popitem(last=False)
