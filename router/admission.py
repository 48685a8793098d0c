"""Admission by session (docs/ARCHITECTURE.md, "agent-session-aware" 6 and 7): when the live sessions'
contexts exceed the pool's KV, hold a session at its tool boundary instead of letting it evict the rest.

The resident sessions are those with a turn in flight or pinned (expected back from a tool call, the
pin `Router.on_complete` returned); their footprint is their latest prompt plus its expected output, in
blocks. A turn of a resident session is always admitted: its context is what the pool is keeping. A
turn of any other session is admitted while the resident footprint plus its own fits in
`admission_fill` x the pool's blocks, and held otherwise; nothing is held while the pool has room.

Held turns are released, as footprint leaves (a turn completes without a pin, a pin expires), in the
order of point 6: sessions in the middle of a tool loop first, then the least attained service, then
arrival. The head is released only when it fits (a small turn does not overtake a large one for ever),
and any turn held `admission_max_hold_s` is released whatever the pressure, so nothing starves.

Pure logic, times passed in; the gateway and the simulator drive it through `Router.admit`,
`Router.release_held` and `Router.cancel_held`.
"""

from __future__ import annotations

import heapq
import itertools

from router.hold_stats import HoldStats


class _Resident:
    __slots__ = ("attained", "blocks", "running", "started", "until")

    def __init__(self, blocks: int) -> None:
        self.blocks = blocks
        self.attained = 0  # service it had attained when its latest turn started
        self.running = 0
        self.started = 0.0  # when its latest turn started
        self.until = float("-inf")  # pinned until then once no turn runs


class _Held:
    __slots__ = ("arrived", "attained", "blocks", "request_id", "session_id")

    def __init__(self, request_id: str, session_id: str, blocks: int, attained: int, arrived: float) -> None:
        self.request_id = request_id
        self.session_id = session_id
        self.blocks = blocks
        self.attained = attained
        self.arrived = arrived


class SessionAdmission:
    def __init__(self, fill: float, max_hold_s: float, max_held: int, yield_to_held: bool = True) -> None:
        if not fill > 0 or max_hold_s < 0 or max_held < 0:
            raise ValueError("need admission_fill > 0, admission_max_hold_s >= 0, admission_max_held >= 0")
        self.fill = fill
        self.max_hold_s = max_hold_s
        self.max_held = max_held
        self.yield_to_held = yield_to_held
        self.capacity = 0  # the pool's KV blocks (the router keeps it up to date)
        self.footprint = 0  # blocks of the resident sessions
        self._residents: dict[str, _Resident] = {}
        self._pins: list[tuple[float, str]] = []  # (until, session): a heap of pin expiries, lazily pruned
        self._held: dict[str, _Held] = {}  # request id -> held turn
        self._queue: list[tuple[int, int, int, str]] = []  # (not in tool loop, attained, order, request id)
        self._by_arrival: list[tuple[float, str]] = []  # (arrived, request id): for the hold bound
        self._order = itertools.count()
        self.stats = HoldStats()  # overdue: released by the hold bound rather than by room

    # --- state

    @property
    def held(self) -> int:
        return len(self._held)

    def resident(self, session_id: str) -> bool:
        return session_id in self._residents

    def room(self) -> float:
        return self.fill * self.capacity - self.footprint

    # --- turns

    def pressed(self, session_id: str, blocks: int, now: float) -> bool:
        """Whether `offer` would hold this turn unless its context is cached already."""
        self._expire_pins(now)
        return session_id not in self._residents and (bool(self._held) or blocks > self.room())

    def offer(
        self,
        request_id: str,
        session_id: str,
        blocks: int,
        tool_pending: bool,
        attained: int,
        now: float,
        cached: bool = False,
    ) -> bool:
        """True: start the turn now (it is resident from here). False: it is held until `release`
        returns its id (or `cancel` drops it). `cached`: most of its context is still in some worker's
        KV, so it evicts little and holding it would save nothing: admitted."""
        self._expire_pins(now)
        admit = (
            cached
            or session_id in self._residents
            or self.capacity <= 0
            or (not self._held and blocks <= self.room())
            or len(self._held) >= self.max_held  # the hold is bounded: past it, nothing more waits
        )
        if admit:
            self._start(session_id, blocks, attained, now)
            return True
        self._held[request_id] = _Held(request_id, session_id, blocks, attained, now)
        heapq.heappush(self._queue, (0 if tool_pending else 1, attained, next(self._order), request_id))
        heapq.heappush(self._by_arrival, (now, request_id))
        self.stats.record_hold()
        return False

    def done(self, session_id: str, pinned_until: float, now: float) -> None:
        """A started turn of the session ended; it stays resident while pinned."""
        r = self._residents.get(session_id)
        if r is None:
            return
        r.running = max(0, r.running - 1)
        if r.running:
            return
        if pinned_until > now and not self._yields(r):
            r.until = pinned_until
            heapq.heappush(self._pins, (pinned_until, session_id))
        else:
            self._leave(session_id)

    def _yields(self, r: _Resident) -> bool:
        """At its tool boundary, a resident session gives its place to the held turn at the head of the
        queue when that one is blocked and has attained less service (least attained service first)."""
        if not self.yield_to_held:
            return False
        queue = self._queue
        while queue and queue[0][3] not in self._held:
            heapq.heappop(queue)
        if not queue:
            return False
        head = self._held[queue[0][3]]
        return head.attained < r.attained and head.blocks > self.room()

    def release(self, now: float) -> list[str]:
        """The held turns to start now, each already resident: the queue's head while it fits, then
        every turn held past the bound."""
        self._expire_pins(now)
        released: list[str] = []
        queue = self._queue
        while queue:
            held = self._held.get(queue[0][3])
            if held is None:
                heapq.heappop(queue)  # cancelled, or released by the bound
                continue
            if held.session_id not in self._residents and held.blocks > self.room():
                break
            heapq.heappop(queue)
            released.append(self._admit_held(held, now, overdue=False))
        by_arrival = self._by_arrival
        while by_arrival and (
            by_arrival[0][1] not in self._held or by_arrival[0][0] + self.max_hold_s <= now
        ):
            _, request_id = heapq.heappop(by_arrival)
            held = self._held.get(request_id)
            if held is not None:
                released.append(self._admit_held(held, now, overdue=True))
        return released

    def cancel(self, request_id: str) -> bool:
        """Forget a held turn (its client went away); False when it is not held."""
        return self._held.pop(request_id, None) is not None

    def next_deadline(self) -> float | None:
        """When `release` may next have something to release without a turn completing: the next pin
        expiry or hold bound (None when nothing is held)."""
        if not self._held:
            return None
        by_arrival = self._by_arrival
        while by_arrival[0][1] not in self._held:  # released or cancelled: a held one is further on
            heapq.heappop(by_arrival)
        deadline = by_arrival[0][0] + self.max_hold_s
        if self._pins:
            deadline = min(deadline, self._pins[0][0])
        return deadline

    def set_capacity(self, blocks: int) -> None:
        self.capacity = max(0, blocks)

    # --- inside

    def expire(self, now: float, running_ttl_s: float) -> None:
        """Drop residents whose turn never reported its end (a caller that lost it) after the TTL."""
        self._expire_pins(now)
        cutoff = now - running_ttl_s
        for sid in [sid for sid, r in self._residents.items() if r.running and r.started < cutoff]:
            self._leave(sid)

    def _admit_held(self, held: _Held, now: float, overdue: bool) -> str:
        del self._held[held.request_id]
        self.stats.record_release(now - held.arrived, overdue)
        self._start(held.session_id, held.blocks, held.attained, now)
        return held.request_id

    def _start(self, session_id: str, blocks: int, attained: int, now: float) -> None:
        r = self._residents.get(session_id)
        if r is None:
            r = self._residents[session_id] = _Resident(0)
        self.footprint += blocks - r.blocks if blocks > r.blocks or not r.running else 0
        r.blocks = max(blocks, r.blocks) if r.running else blocks
        r.running += 1
        r.attained = attained
        r.started = now
        r.until = float("-inf")

    def _leave(self, session_id: str) -> None:
        r = self._residents.pop(session_id)
        self.footprint -= r.blocks

    def _expire_pins(self, now: float) -> None:
        pins = self._pins
        while pins and pins[0][0] <= now:
            until, sid = heapq.heappop(pins)
            r = self._residents.get(sid)
            if r is not None and not r.running and r.until == until:
                self._leave(sid)
