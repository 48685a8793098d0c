"""Requests that wait for the router before they go on, each released by the router's own rule.

`SessionHold` applies the router's admission by session (router/admission.py): under KV memory
pressure a turn of a session that is not resident waits, at its tool boundary, until the router
releases it (a resident session's turn completes or its pin ends, or the hold bound passes); then the
per-worker slots (`gateway.admission`) take it. The router's overload queue (router/overload_queue.py)
waits here the same way, released as prefills end (first tokens) and turns complete. `RoomHold`
applies the router's room queue (router/room.py) or its memory hold (router/memory_hold.py): a picked
request waits until its worker has KV room for it, re-checked after completions, load reports and
first tokens (`changed`).
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod

from router.request import Decision, RouteRequest
from router.router import Router


class RouterHold(ABC):
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

    @abstractmethod
    def _released(self, now: float) -> list[str]:
        """The requests the router lets go of now."""

    @abstractmethod
    def _deadline(self) -> float | None:
        """When the router next lets one go by itself (its hold bound), if any is held."""

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


class SessionHold(RouterHold):
    """Waits out the router's session admission or overload queue: `enter` returns once the request
    may be routed."""

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


class RoomHold(RouterHold):
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

    def changed(self) -> None:
        """Something a held pick's release reads changed (a load report, a first token): re-check the
        picks it concerns now, where the router re-checks on change rather than on a period."""
        router = self.router
        if self._waiting and router.rechecks_rooms_on_change and router.rooms_pending():
            self.poke()

    def _released(self, now: float) -> list[str]:
        return self.router.release_rooms(now)

    def _deadline(self) -> float | None:
        return self.router.rooms_deadline()
