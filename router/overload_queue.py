"""A router queue for an overloaded pool: turns wait unplaced while every worker is busy.

A pick made while every worker is busy is made on state that will be stale by the time the turn can
run, and once sent it waits first come first served in its worker's queue (or, held for memory at the
router, bound to that worker). NVIDIA Dynamo's router queue (`--router-queue-threshold`,
`--router-queue-policy wspt`) parks a request before its pick while every worker has prefill in
flight, and releases the shortest first as workers free up, each then picked on fresh state. Here a
worker is busy while the router has prefill in flight there (sent or held, before its first token)
beyond a threshold, or, with `memory_busy`, only while it has a pick held for device memory (the
queue forms only once every worker's memory is short). Waiting turns leave shortest predicted prefill
first (`wspt`; else in arrival order), as many at once as workers are free, and any after
`max_hold_s` whatever the load: nothing starves.

Pure bookkeeping, times passed in; the router says which workers are busy and what a turn would
prefill.
"""

from __future__ import annotations

import heapq
import itertools

from router.hold_stats import HoldStats


class OverloadQueue:
    def __init__(
        self, max_hold_s: float, max_held: int, wspt: bool, memory_busy: bool, threshold_tokens: int
    ) -> None:
        if max_hold_s < 0 or max_held < 0 or threshold_tokens < 0:
            raise ValueError(
                "need overload_max_hold_s >= 0, overload_max_held >= 0 and overload_busy_tokens >= 0"
            )
        self.max_hold_s = max_hold_s
        self.max_held = max_held
        self.wspt = wspt
        self.memory_busy = memory_busy
        self.threshold_tokens = threshold_tokens
        self._queue: list[tuple[int, int, str]] = []  # (prefill or 0, arrival order, request id): a heap
        self._arrived: dict[str, float] = {}  # request id -> arrival, in arrival order (the waiting ones)
        self._released: set[str] = set()  # let go and not picked yet: each takes a free worker
        self._seq = itertools.count()
        self.stats = HoldStats()  # overdue: released by the bound rather than by a free worker

    @property
    def held(self) -> int:
        return len(self._arrived)

    def offer(self, request_id: str, prefill_tokens: int, free_workers: int, now: float) -> bool:
        """True: pick the turn now (a worker is free, and no turn waits for one: it would overtake
        them). False: it waits until `release` returns its id."""
        if (free_workers > len(self._released) and not self._arrived) or len(self._arrived) >= self.max_held:
            return True
        key = prefill_tokens if self.wspt else 0
        heapq.heappush(self._queue, (key, next(self._seq), request_id))
        self._arrived[request_id] = now
        self.stats.record_hold()
        return False

    def release(self, free_workers: int, now: float) -> list[str]:
        """The turns to pick now: the first in order, one per free worker (less those released and not
        picked yet), and every one waiting `max_hold_s`."""
        out: list[str] = []
        slots = free_workers - len(self._released)
        while self._queue and slots > 0:
            rid = heapq.heappop(self._queue)[2]
            if self._let_go(rid, now, overdue=False):
                out.append(rid)
                slots -= 1
        # `arrived + max_hold_s`, as `next_deadline` computes it: `now - max_hold_s` can round below
        # the arrival at that very deadline, and a timer set there would find nothing to release
        bound = self.max_hold_s
        overdue = list(itertools.takewhile(lambda item: item[1] + bound <= now, self._arrived.items()))
        for rid, _ in overdue:  # in arrival order: the oldest first
            self._let_go(rid, now, overdue=True)
            out.append(rid)
        if len(self._queue) > 2 * len(self._arrived) + 64:  # entries of cancelled or overdue turns
            self._queue = [e for e in self._queue if e[2] in self._arrived]
            heapq.heapify(self._queue)
        return out

    def _let_go(self, request_id: str, now: float, overdue: bool) -> bool:
        arrived = self._arrived.pop(request_id, None)
        if arrived is None:
            return False  # cancelled or released by the bound already
        self._released.add(request_id)
        self.stats.record_release(now - arrived, overdue)
        return True

    def picked(self, request_id: str) -> None:
        """The turn was picked (released or not): it no longer reserves a free worker."""
        self._released.discard(request_id)

    def cancel(self, request_id: str) -> None:
        """The turn waits or was released but will not be picked (client gone): forget it."""
        self._arrived.pop(request_id, None)
        self._released.discard(request_id)

    def next_deadline(self) -> float | None:
        """When the oldest waiting turn's bound passes; None: none waits."""
        first = next(iter(self._arrived.values()), None)
        return None if first is None else first + self.max_hold_s
