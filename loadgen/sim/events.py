"""Virtual time: a clock and a queue of timed callbacks, run in time order.

Ties run in the order they were scheduled (a sequence number breaks them), so a run is a pure
function of its inputs: same trace, same seed, same numbers.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Callable
from typing import Any

Callback = Callable[..., None]
Entry = tuple[float, int, Callback, tuple[Any, ...]]


class EventLoop:
    """A discrete-event loop: `at(t, fn, *args)` runs `fn(*args)` when virtual time reaches `t`.

    `defer_at(t, fn, *args)` is for callbacks whose only effect is read at `settle()` points (the
    simulator's load reports, 1 of 3 events, only change the router's view): they wait in a FIFO
    instead of the heap, and `settle()` runs the ones the heap would have run before the current event.
    """

    __slots__ = ("_deferred", "_heap", "_inline", "_seq", "events_run", "now", "seq")

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self.seq = 0  # the scheduling number of the event running now
        self._heap: list[Entry] = []
        self._deferred: deque[Entry] = deque()
        self._seq = 0
        self.events_run = 0
        self._inline = False  # whether `next_now` may run its callback at once (an unbounded run)

    def clock(self) -> float:
        """The current virtual time in seconds (what the engine and router are given as `now`)."""
        return self.now

    def at(self, when: float, fn: Callback, *args: Any) -> None:
        # never in the past: a callback scheduled "now" runs after the ones already due now
        seq = self._seq = self._seq + 1
        now = self.now
        heapq.heappush(self._heap, (now if now > when else when, seq, fn, args))

    def after(self, delay: float, fn: Callback, *args: Any) -> None:
        seq = self._seq = self._seq + 1
        now = self.now
        when = now + delay
        heapq.heappush(self._heap, (now if now > when else when, seq, fn, args))

    def next_now(self, fn: Callback, *args: Any) -> None:
        """`at(now, fn, *args)`, but run at once when nothing else is due now: the loop would run it
        next anyway (with the scheduling number it gets here), so the heap round trip is saved."""
        heap = self._heap
        if not self._inline or (heap and heap[0][0] <= self.now):
            self.at(self.now, fn, *args)
            return
        self.seq = self._seq = self._seq + 1
        self.events_run += 1
        fn(*args)

    def defer_at(self, when: float, fn: Callback, *args: Any) -> None:
        """Like `at`, for a callback that schedules nothing and whose effect only callbacks that call
        `settle()` first can see. It runs, with `now` and `seq` as the heap would have run it, at the
        first `settle()` after its time, or when the heap runs dry."""
        seq = self._seq = self._seq + 1
        now = self.now
        entry = (now if now > when else when, seq, fn, args)
        deferred = self._deferred
        if deferred and entry[0] < deferred[-1][0]:
            # out of FIFO order: an ordinary event then, after the deferred ones due before it
            heapq.heappush(self._heap, (entry[0], seq, self._settled, (fn, args)))
        else:
            deferred.append(entry)

    def _settled(self, fn: Callback, args: tuple[Any, ...]) -> None:
        self.settle()
        fn(*args)

    def settle(self) -> None:
        """Run the deferred callbacks that come before the running event, in (time, seq) order."""
        deferred = self._deferred
        if not deferred:
            return
        now, seq = self.now, self.seq
        ran = 0
        while deferred:
            when, s, fn, args = deferred[0]
            if when > now or (when == now and s > seq):
                break
            deferred.popleft()
            self.now, self.seq = when, s
            fn(*args)
            ran += 1
        self.now, self.seq = now, seq
        self.events_run += ran

    def __len__(self) -> int:
        return len(self._heap) + len(self._deferred)

    def run(self, until: float | None = None, max_events: int | None = None) -> None:
        """Run callbacks in time order until none are left (or `until`, or `max_events`)."""
        heap = self._heap
        pop = heapq.heappop
        ran = 0
        try:
            if until is None and max_events is None:
                self._inline = True
                while heap:
                    when, seq, fn, args = pop(heap)
                    self.now, self.seq = when, seq
                    fn(*args)
                    ran += 1
            else:
                budget = max_events if max_events is not None else -1
                while heap and budget != 0:
                    if until is not None and heap[0][0] > until:
                        self.now = until
                        return
                    when, seq, fn, args = pop(heap)
                    self.now, self.seq = when, seq
                    fn(*args)
                    ran += 1
                    budget -= 1
                if budget == 0:
                    return
            self._drain_deferred(until)
        finally:
            self._inline = False
            self.events_run += ran

    def _drain_deferred(self, until: float | None) -> None:
        """The heap ran dry: what is deferred would have run next, in order."""
        deferred = self._deferred
        while deferred and (until is None or deferred[0][0] <= until):
            when, seq, fn, args = deferred.popleft()
            self.now, self.seq = when, seq
            fn(*args)
            self.events_run += 1
        if until is not None and deferred:
            self.now = until


class DeadlineTimer:
    """One pending call of `release` at the earliest deadline `deadline()` has named (a router hold's
    bound): `arm` after holding something, and `release` runs at the deadline after the loop settles.
    A later, earlier deadline schedules another call; a superseded one still runs (release is idempotent)."""

    __slots__ = ("_at", "_deadline", "_loop", "_release")

    def __init__(
        self, loop: EventLoop, deadline: Callable[[], float | None], release: Callable[[], None]
    ) -> None:
        self._loop = loop
        self._deadline = deadline
        self._release = release
        self._at = math.inf  # when a call is scheduled

    def arm(self) -> None:
        deadline = self._deadline()
        if deadline is not None and deadline < self._at:
            self._at = deadline = max(deadline, self._loop.now)
            self._loop.at(deadline, self._tick, deadline)

    def _tick(self, at: float) -> None:
        self._loop.settle()
        if at == self._at:
            self._at = math.inf
        self._release()
