"""Virtual time: a clock and a queue of timed callbacks, run in time order.

Ties run in the order they were scheduled (a sequence number breaks them), so a run is a pure
function of its inputs: same trace, same seed, same numbers.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Any

Callback = Callable[..., None]


class EventLoop:
    """A discrete-event loop: `at(t, fn, *args)` runs `fn(*args)` when virtual time reaches `t`."""

    __slots__ = ("_heap", "_seq", "events_run", "now")

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self._heap: list[tuple[float, int, Callback, tuple[Any, ...]]] = []
        self._seq = 0
        self.events_run = 0

    def clock(self) -> float:
        """The current virtual time in seconds (what the engine and router are given as `now`)."""
        return self.now

    def at(self, when: float, fn: Callback, *args: Any) -> None:
        # never in the past: a callback scheduled "now" runs after the ones already due now
        self._seq += 1
        heapq.heappush(self._heap, (max(when, self.now), self._seq, fn, args))

    def after(self, delay: float, fn: Callback, *args: Any) -> None:
        self.at(self.now + delay, fn, *args)

    def next_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def __len__(self) -> int:
        return len(self._heap)

    def run(self, until: float | None = None, max_events: int | None = None) -> None:
        """Run callbacks in time order until none are left (or `until`, or `max_events`)."""
        heap = self._heap
        pop = heapq.heappop
        budget = max_events if max_events is not None else -1
        while heap and budget != 0:
            if until is not None and heap[0][0] > until:
                self.now = until
                return
            when, _, fn, args = pop(heap)
            self.now = when
            fn(*args)
            self.events_run += 1
            budget -= 1
