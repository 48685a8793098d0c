"""`session_sticky`: consistent hashing of the session id onto a ring of workers (vLLM production-stack's
`session` router). A worker joining or leaving moves only the sessions of its arcs."""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence

import xxhash

from router.policies.base import Policy, RouterView
from router.request import Decision, RouteRequest

_hash = xxhash.xxh3_64_intdigest


class SessionSticky(Policy):
    name = "session_sticky"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._ring_workers: tuple[str, ...] = ()
        self._points: list[int] = []
        self._owners: list[str] = []

    def on_workers_changed(self, workers: Sequence[str]) -> None:
        ring = sorted(
            (_hash(f"{worker}#{v}".encode()), worker)
            for worker in workers
            for v in range(self.config.ring_vnodes)
        )
        self._ring_workers = tuple(sorted(workers))
        self._points = [p for p, _ in ring]
        self._owners = [w for _, w in ring]

    def pick(self, request: RouteRequest, view: RouterView) -> Decision:
        allowed = set(view.candidates)
        if not self._points or not allowed <= set(self._ring_workers):
            self.on_workers_changed(view.candidates)
        key = request.session_id or (str(request.block_hashes[0]) if request.block_hashes else "")
        start = bisect_right(self._points, _hash(key.encode()))
        owners = self._owners
        n = len(owners)
        for i in range(n):  # clockwise to the first allowed worker (skips excluded ones)
            worker = owners[(start + i) % n]
            if worker in allowed:
                return Decision(worker, view.overlap(request.block_hashes).get(worker, 0), 0.0, "session")
        raise LookupError("no candidate on the ring")
