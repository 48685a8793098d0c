"""Per-worker in-flight limits and, when every worker is saturated, a bounded queue by session.

The queue favours sessions in the middle of a tool loop, then those with the least attained service
(tokens served so far), then arrival order, so one long agent does not starve the rest
(docs/ARCHITECTURE.md, "agent-session-aware" point 6). A slot is handed to a waiter by routing it at
that moment, so a fresh request cannot take the slot between the release and the waiter waking up.

Before that, `SessionHold` applies the router's admission by session (router/admission.py): under KV
memory pressure a turn of a session that is not resident waits here, at its tool boundary, until the
router releases it (a resident session's turn completes or its pin ends, or the hold bound passes).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable

from router.request import Decision, RouteRequest
from router.router import Router

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


class _RouterHold:
    """Requests waiting for the router to release them: `poke` after completions, and a timer for the
    router's next deadline (its hold bound)."""

    def __init__(self, router: Router, timeout_s: float) -> None:
        self.router = router
        self.timeout_s = timeout_s  # a safety net: the router releases within its own hold bound
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")

    @property
    def held(self) -> int:
        return len(self._waiting)

    def _released(self, now: float) -> list[str]:
        raise NotImplementedError

    def _deadline(self) -> float | None:
        raise NotImplementedError

    async def _wait(self, request_id: str) -> None:
        """Wait until `poke` releases the request; TimeoutError after `timeout_s`."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        self._arm()
        try:
            await asyncio.wait_for(asyncio.shield(future), self.timeout_s)
        finally:
            self._waiting.pop(request_id, None)

    def poke(self) -> None:
        """Let go of the requests the router releases now (after a completion, at a deadline)."""
        if not self._waiting:
            return
        for request_id in self._released(time.monotonic()):
            future = self._waiting.pop(request_id, None)
            if future is not None and not future.done():
                future.set_result(None)
        self._arm()

    def _arm(self) -> None:
        deadline = self._deadline()
        if deadline is None or deadline >= self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        delay = max(0.0, deadline - time.monotonic())
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        self.poke()


class SessionHold(_RouterHold):
    """Waits out the router's session admission: `enter` returns once the request may be routed."""

    async def enter(self, route: RouteRequest) -> None:
        """Returns when the request may be picked; raises TimeoutError (or CancelledError) having
        handed its place back. Call `leave` if it is then not picked after all."""
        if self.router.admit(route, time.monotonic()):
            return
        try:
            await self._wait(route.request_id)
        except (TimeoutError, asyncio.CancelledError):
            self.leave(route)
            raise

    def leave(self, route: RouteRequest) -> None:
        """The request entered (or waits) but will not be picked: forget it, or hand back its place."""
        self.router.cancel_held(route.request_id, route.session_id, time.monotonic())

    def _released(self, now: float) -> list[str]:
        return self.router.release_held(now)

    def _deadline(self) -> float | None:
        return self.router.held_deadline()


class RoomHold(_RouterHold):
    """Waits out the router's room queue (router/room.py): a picked request is sent once its worker
    has KV room for it, rather than queued in the engine ahead of requests that fit."""

    async def enter(self, route: RouteRequest, decision: Decision) -> None:
        """Returns when the picked request may be sent to its worker (at the latest after `timeout_s`,
        when it is sent anyway); on cancellation the router forgets it before it re-raises."""
        if self.router.room_offer(route, decision, time.monotonic()):
            return
        try:
            await self._wait(route.request_id)
        except TimeoutError:
            self.router.send_room_now(route.request_id, time.monotonic())  # the bound passed unseen
        except asyncio.CancelledError:
            self.router.cancel_room(route.request_id)
            raise

    def _released(self, now: float) -> list[str]:
        return self.router.release_rooms(now)

    def _deadline(self) -> float | None:
        return self.router.rooms_deadline()
