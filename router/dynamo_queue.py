"""NVIDIA Dynamo 1.6.1's router queue (`--router-queue-threshold F --router-queue-policy fcfs|wspt`),
for `kv_overlap`; kept apart from kvgate's own `overload_queue` (session_kv's), whose rules differ.

Dynamo's `SchedulerQueue` (`lib/kv-router/src/scheduling/queue.rs`; its order in `policy_queue.rs`, the
busy test in `policy_config.rs` `PolicyClassConfig::worker_is_busy`):

- Busy: a worker is busy while the router's own count of prefill tokens in flight there (each request
  it routed adds `ISL - cached` at its pick and removes it at its first token; `kv_overlap`'s tracking)
  exceeds `F x max_num_batched_tokens` (the worker's; 10,000,000 when it announces none). At `F = 0`:
  busy while any request routed there has no first token yet.
- A request waits, before its worker is selected, while every worker it may go to is busy (only its
  session's bound worker when session affinity binds it: the binding is its pinned worker), and also
  whenever any request waits at all (`has_backlog`: no overtaking the queue).
- Order: `fcfs` by arrival; `wspt` by `1 / max(1, ISL - cached)` highest first (Smith's rule at weight
  1: the shortest uncached prefill first), `cached` taken at enqueue on its pinned worker, else the
  best worker. Ties: arrival order. A pinned request waits in its worker's lane, the others in one
  shared heap; the next released is the best head among those whose workers are not all busy (a lane
  whose worker is busy does not block the others).
- Released: on every first token and completion the router sees (`mark_prefill_completed`, `free`),
  and by a periodic re-check every 60 s; each released request is selected on the state of then (the
  KV cost over every worker: a free worker only opens the gate) and booked before the next is tested.
  The overlap it is scored with is the one taken at enqueue, re-read when it waited 10 s or more
  (`DYN_ROUTER_OVERLAP_REFRESH_AFTER_SECS`). No time bound: a request waits until released.

This class is the bookkeeping alone (times and the busy test passed in); `Router` selects.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable

from router.hold_stats import HoldStats

# a worker's max_num_batched_tokens when it announces none (queue.rs DEFAULT_MAX_BATCHED_TOKENS)
DEFAULT_MAX_BATCHED_TOKENS = 10_000_000

# is this worker busy (a request pinned there), or every worker (None: an unpinned request)?
BusyTest = Callable[[str | None], bool]

_Item = tuple[float, int, str]  # (-policy score, enqueue order, request id): a heap, smallest first


class DynamoQueue:
    def __init__(self, threshold: float, wspt: bool, recheck_s: float) -> None:
        self.threshold = threshold
        self.wspt = wspt
        self.recheck_s = recheck_s
        self._shared: list[_Item] = []
        self._lanes: dict[str, list[_Item]] = {}
        self._waiting: dict[str, float] = {}  # request id -> enqueued at
        self._seq = itertools.count()
        self._checked_at = 0.0
        self.stats = HoldStats()  # Dynamo's queue has no bound: none is ever overdue

    @property
    def held(self) -> int:
        return len(self._waiting)

    def busy(self, prefill_tokens: int, max_batched_tokens: int) -> bool:
        """Dynamo's test for one worker (`worker_is_busy`), strictly above the threshold."""
        limit = max_batched_tokens if max_batched_tokens > 0 else DEFAULT_MAX_BATCHED_TOKENS
        return prefill_tokens > self.threshold * limit

    def offer(
        self, request_id: str, pinned: str | None, cost_tokens: int, now: float, busy: BusyTest
    ) -> bool:
        """True: select the request now. False: it waits until `pop` returns it."""
        if not self._waiting and not busy(pinned):
            return True
        # fcfs: Dynamo's score is -(seconds since start); wspt: 1 / the prefill it would do
        key = -1.0 / max(1, cost_tokens) if self.wspt else now
        item = (key, next(self._seq), request_id)
        heapq.heappush(self._shared if pinned is None else self._lanes.setdefault(pinned, []), item)
        self._waiting[request_id] = now
        self.stats.record_hold()
        return False

    def pop(self, now: float, busy: BusyTest) -> str | None:
        """The next request to select now, or None: the best head of those whose workers are not all
        busy (call again after booking it: its prefill may make its worker busy)."""
        self._checked_at = now
        best: _Item | None = None
        lane_of: str | None = None
        heads: list[tuple[str | None, list[_Item]]] = [(None, self._shared), *self._lanes.items()]
        for worker, heap in heads:
            head = self._head(heap)
            if head is None and worker is not None:
                del self._lanes[worker]  # only cancelled requests were left in it
            elif head is not None and (best is None or head < best) and not busy(worker):
                best, lane_of = head, worker
        if best is None:
            return None
        heapq.heappop(self._shared if lane_of is None else self._lanes[lane_of])
        if lane_of is not None and not self._lanes[lane_of]:
            del self._lanes[lane_of]
        self.stats.record_release(now - self._waiting.pop(best[2]), overdue=False)
        return best[2]

    def _head(self, heap: list[_Item]) -> _Item | None:
        while heap and heap[0][2] not in self._waiting:  # cancelled
            heapq.heappop(heap)
        return heap[0] if heap else None

    def cancel(self, request_id: str) -> bool:
        """Forget a waiting request (its client went away); False: it was not waiting."""
        return self._waiting.pop(request_id, None) is not None

    def next_deadline(self) -> float | None:
        """The periodic re-check's next tick while any request waits (ticks at multiples of
        `recheck_s`, as a tokio interval from the router's start)."""
        if not self._waiting:
            return None
        return (math.floor(self._checked_at / self.recheck_s) + 1) * self.recheck_s
