"""A router-side hold for a turn that would block its worker's queue while it waits for device memory.

An engine admits first come first served (vLLM v1: its waiting loop stops at the first request that
cannot get its blocks), so a prompt that does not fit beside the running requests waits at the head
of its worker's queue, and every request routed there behind it waits too, even one that would fit.
Here such a pick waits at the router instead: it is sent once the predicted wait for device memory on
its worker (router/policies/memory_wait.py, the policy's `memory_wait_ms`) is at most `min_wait_ms`,
and after a bound whatever the wait (then it heads the engine's queue, and the picks after it are
predicted to wait behind it: no starvation). A pick sent past held ones is one predicted not to wait:
the head-of-line block becomes a skip-ahead at the router. The bound is `max_hold_s` for a pick held
alone for its worker and `crowded_max_hold_s` while others are held for the same worker: sent, it
would head the queue that all of them then wait behind, as would every turn routed there meanwhile
(at twice the live comparison's arrival rate such jams made the tail; docs/EXPERIMENTS.md, "Memory
hold, third pass"). With `shortest_first`, a pick whose bound passes goes with every pick held for its
worker that is shorter than it, shortest first, ahead of it: the engine's queue then serves them in
that order, as NVIDIA Dynamo's `wspt` router queue serves its backlog (on a worker jammed by prompts
that each need most of its memory, the shorter ones are through sooner; docs/EXPERIMENTS.md, "The
full cc trace turn by turn"). Each pick still goes by its own bound at the latest.

Every held pick is re-checked every `recheck_s` and after any completion; with `recheck_s` 0, only
when something its prediction reads changes on its worker (`changed`: a load report, a first token, a
completion, a pick sent there, the worker leaving or its report going stale), and only the picks held
for that worker. Either way a pass walks a worker's requests once for all the picks held for it
(the router asks the policy for `memory_waits` per worker).

This is the one record of what is held: the load view asks it which picks on a worker its reports do
not count (`on`), the policies' views read it as the set of picks not at their worker.

The room queue (router/room.py) holds on the router's own count of the prompt blocks sent to a
worker, which counts a prefix shared by several running requests once per request; on agent sessions
that share long system prompts it held nearly everything (docs/EXPERIMENTS.md, "Live, fourth pass").

Pure bookkeeping, times passed in; the router decides each release with the prediction.
"""

from __future__ import annotations

from collections.abc import Iterator, KeysView, Sequence

from router.hold_stats import HoldStats

_NONE: KeysView[str] = {}.keys()


class _Held:
    __slots__ = ("at", "chain", "worker_id")

    def __init__(self, worker_id: str, chain: Sequence[int], at: float) -> None:
        self.worker_id = worker_id
        self.chain = chain
        self.at = at


class MemoryHold:
    def __init__(
        self,
        max_hold_s: float,
        max_held: int,
        recheck_s: float,
        min_wait_ms: float,
        crowded_max_hold_s: float | None = None,
        shortest_first: bool = False,
    ) -> None:
        crowded = max_hold_s if crowded_max_hold_s is None else crowded_max_hold_s
        if min(max_hold_s, max_held, recheck_s, min_wait_ms, crowded) < 0:
            raise ValueError(
                "need memory_hold_max_s >= 0, memory_hold_max_held >= 0, memory_hold_recheck_s >= 0, "
                "memory_hold_min_wait_ms >= 0 and memory_hold_crowded_max_s >= 0"
            )
        self.max_hold_s = max_hold_s
        self.crowded_max_hold_s = crowded
        self.max_held = max_held
        self.recheck_s = recheck_s
        self.min_wait_ms = min_wait_ms
        self.shortest_first = shortest_first
        self._held: dict[str, _Held] = {}  # request id -> held pick, in arrival order
        self._by_worker: dict[str, dict[str, _Held]] = {}  # the same records by worker, arrival order
        self._changed: set[str] = set()  # workers with held picks whose state changed since a check
        self._next_check = float("inf")  # with `recheck_s`: the next periodic pass
        self.stats = HoldStats()  # overdue: sent by the bound rather than by a short enough wait

    @property
    def held(self) -> int:
        return len(self._held)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._held

    def __iter__(self) -> Iterator[str]:
        return iter(self._held)

    def on(self, worker_id: str) -> KeysView[str]:
        """The ids of the picks held for `worker_id`, oldest first."""
        held = self._by_worker.get(worker_id)
        return held.keys() if held is not None else _NONE

    def workers(self) -> KeysView[str]:
        """The workers with held picks."""
        return self._by_worker.keys()

    def offer(
        self, request_id: str, worker_id: str, chain: Sequence[int], wait_ms: float, now: float
    ) -> bool:
        """True: send the pick now (its predicted wait `wait_ms` is short enough, or too many wait).
        False: it waits until `send` lets it go."""
        if wait_ms <= self.min_wait_ms or len(self._held) >= self.max_held:
            return True
        held = self._held[request_id] = _Held(worker_id, chain, now)
        self._by_worker.setdefault(worker_id, {})[request_id] = held
        self.stats.record_hold()
        if self.recheck_s:
            self._next_check = min(self._next_check, now + self.recheck_s)
        return False

    def changed(self, worker_id: str) -> None:
        """Something the prediction reads changed on the worker: its held picks are re-checked at the
        next pass (`due`). A no-op for a worker holding none."""
        if worker_id in self._by_worker:
            self._changed.add(worker_id)

    def changed_all(self) -> None:
        self._changed.update(self._by_worker)

    @property
    def pending(self) -> bool:
        """Whether a worker's held picks wait for a re-check (a pass now would look at them)."""
        return bool(self._changed)

    def due(self, now: float) -> list[tuple[str, str, Sequence[int]]]:
        """The held picks to re-check in a pass at `now`, oldest first, (request id, worker, chain):
        those on workers whose state changed and those whose bound passed; with `recheck_s`, every one
        (the caller passes on that period and after completions)."""
        changed = self._changed
        if self.recheck_s or len(changed) == len(self._by_worker):
            return [(rid, h.worker_id, h.chain) for rid, h in self._held.items()]
        held = self._held.items()
        return [
            (rid, h.worker_id, h.chain)
            for rid, h in held
            if h.worker_id in changed or self._deadline(h) <= now
        ]

    def with_shorter(self, request_id: str) -> list[str]:
        """The ids of the held picks to send as `request_id`'s bound passes, in order: with
        `shortest_first`, those held for its worker with fewer blocks than it, shortest first (the older
        of two alike first), then it; else it alone."""
        if not self.shortest_first:
            return [request_id]
        held = self._held[request_id]
        size = len(held.chain)
        on_worker = self._by_worker[held.worker_id]
        shorter = sorted(
            (rid for rid, other in on_worker.items() if len(other.chain) < size),
            key=lambda rid: len(on_worker[rid].chain),  # a stable sort: arrival order among equals
        )
        return [*shorter, request_id]

    def overdue(self, request_id: str, now: float) -> bool:
        held = self._held.get(request_id)
        return held is not None and self._deadline(held) <= now

    def _deadline(self, held: _Held) -> float:
        """When `held` goes whatever its wait: its bound, the longer one while others are held for its
        worker."""
        crowded = len(self._by_worker[held.worker_id]) > 1
        return held.at + (self.crowded_max_hold_s if crowded else self.max_hold_s)

    def send(self, request_id: str, now: float, overdue: bool = False) -> bool:
        """The held pick goes now (its wait is short enough, or `overdue`: the bound passed); False
        when it was not held."""
        held = self._forget(request_id)
        if held is None:
            return False
        self.stats.record_release(now - held.at, overdue)
        return True

    def checked(self, now: float) -> None:
        """A release pass ran at `now` over `due`: nothing is left changed; with `recheck_s`, the next
        pass is due that much later while any is held."""
        self._changed.clear()
        if self.recheck_s:
            self._next_check = now + self.recheck_s if self._held else float("inf")

    def done(self, request_id: str) -> None:
        """The held pick will not be sent (its client went away): forget it."""
        self._forget(request_id)

    def next_deadline(self) -> float | None:
        """When the next pass is due if nothing changes before: the earliest bound of a held pick (and
        the next periodic pass, with `recheck_s`); None: none held."""
        if not self._held:
            return None
        # per worker, its oldest pick's bound comes first (dicts keep insertion order)
        bounds = (self._deadline(next(iter(on_worker.values()))) for on_worker in self._by_worker.values())
        return min(min(bounds), self._next_check)

    def _forget(self, request_id: str) -> _Held | None:
        held = self._held.pop(request_id, None)
        if held is not None:
            on_worker = self._by_worker[held.worker_id]
            del on_worker[request_id]
            if not on_worker:
                del self._by_worker[held.worker_id]
                self._changed.discard(held.worker_id)
        return held
