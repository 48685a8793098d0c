"""A router-side hold for a turn that would block its worker's queue while it waits for device memory.

An engine admits first come first served (vLLM v1: its waiting loop stops at the first request that
cannot get its blocks), so a prompt that does not fit beside the running requests waits at the head
of its worker's queue, and every request routed there behind it waits too, even one that would fit.
Here such a pick waits at the router instead: it is sent once the predicted wait for device memory on
its worker (router/policies/memory_wait.py, the policy's `memory_wait_ms`) is at most `min_wait_ms`,
re-checked every `recheck_s` and after each completion, and after `max_hold_s` whatever the wait
(then it heads the engine's queue, and the picks after it are predicted to wait behind it: no
starvation). A pick sent past held ones is one predicted not to wait: the head-of-line block becomes
a skip-ahead at the router.

The room queue (router/room.py) holds on the router's own count of the prompt blocks sent to a
worker, which counts a prefix shared by several running requests once per request; on agent sessions
that share long system prompts it held nearly everything (docs/EXPERIMENTS.md, "Live, fourth pass").

Pure bookkeeping, times passed in; the router decides each release with the prediction.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence


class _Held:
    __slots__ = ("at", "chain", "worker_id")

    def __init__(self, worker_id: str, chain: Sequence[int], at: float) -> None:
        self.worker_id = worker_id
        self.chain = chain
        self.at = at


class MemoryHold:
    def __init__(self, max_hold_s: float, max_held: int, recheck_s: float, min_wait_ms: float) -> None:
        if max_hold_s < 0 or max_held < 0 or recheck_s <= 0 or min_wait_ms < 0:
            raise ValueError(
                "need memory_hold_max_s >= 0, memory_hold_max_held >= 0, memory_hold_recheck_s > 0 "
                "and memory_hold_min_wait_ms >= 0"
            )
        self.max_hold_s = max_hold_s
        self.max_held = max_held
        self.recheck_s = recheck_s
        self.min_wait_ms = min_wait_ms
        self._held: dict[str, _Held] = {}  # request id -> held pick, in arrival order
        self._next_check = float("inf")
        self.held_total = 0  # picks ever held (for reports)
        self.overdue_total = 0  # of which sent by the bound
        self.hold_s = 0.0  # seconds they waited here, in all

    @property
    def held(self) -> int:
        return len(self._held)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._held

    def __iter__(self) -> Iterator[str]:
        return iter(self._held)

    def offer(
        self, request_id: str, worker_id: str, chain: Sequence[int], wait_ms: float, now: float
    ) -> bool:
        """True: send the pick now (its predicted wait `wait_ms` is short enough, or too many wait).
        False: it waits until `release` lets it go."""
        if wait_ms <= self.min_wait_ms or len(self._held) >= self.max_held:
            return True
        self._held[request_id] = _Held(worker_id, chain, now)
        self.held_total += 1
        self._next_check = min(self._next_check, now + self.recheck_s)
        return False

    def waiting(self) -> list[tuple[str, str, Sequence[int]]]:
        """The held picks, oldest first: (request id, worker, chain)."""
        return [(rid, h.worker_id, h.chain) for rid, h in self._held.items()]

    def overdue(self, request_id: str, now: float) -> bool:
        held = self._held.get(request_id)
        return held is not None and held.at + self.max_hold_s <= now

    def send(self, request_id: str, now: float, overdue: bool = False) -> None:
        """The held pick goes now (its wait is short enough, or `overdue`: the bound passed)."""
        held = self._held.pop(request_id, None)
        if held is not None:
            self.hold_s += now - held.at
            self.overdue_total += overdue

    def checked(self, now: float) -> None:
        """A release pass ran at `now`: the next one is due `recheck_s` later while any is held."""
        self._next_check = now + self.recheck_s if self._held else float("inf")

    def done(self, request_id: str) -> None:
        """The held pick will not be sent (its client went away): forget it."""
        self._held.pop(request_id, None)

    def next_deadline(self) -> float | None:
        """When the next release pass is due if nothing completes before; None: none held."""
        first = next(iter(self._held.values()), None)  # the oldest: dicts keep insertion order
        if first is None:
            return None
        return min(first.at + self.max_hold_s, self._next_check)
