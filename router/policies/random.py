"""`random`: a uniformly random worker (the usual floor of routing comparisons)."""

from __future__ import annotations

from router.policies.base import Policy, RouterView
from router.request import Decision, RouteRequest


class RandomPolicy(Policy):
    name = "random"

    def pick(self, request: RouteRequest, view: RouterView) -> Decision:
        worker = self.rng.choice(view.candidates)
        return Decision(worker, view.overlap(request.block_hashes).get(worker, 0), 0.0, "random")
