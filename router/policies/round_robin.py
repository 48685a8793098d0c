"""`round_robin`: the next worker in turn (vLLM production-stack's default)."""

from __future__ import annotations

from router.policies.base import Policy, RouterView
from router.request import Decision, RouteRequest


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._next = 0

    def pick(self, request: RouteRequest, view: RouterView) -> Decision:
        workers = view.candidates
        worker = workers[self._next % len(workers)]
        self._next += 1
        return Decision(worker, view.overlap(request.block_hashes).get(worker, 0), 0.0, "round_robin")
