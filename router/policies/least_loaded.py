"""`least_loaded`: the worker with the fewest requests in flight from this router (ties: first listed)."""

from __future__ import annotations

from router.policies.base import Policy, RouterView
from router.request import Decision, RouteRequest


class LeastLoaded(Policy):
    name = "least_loaded"

    def pick(self, request: RouteRequest, view: RouterView) -> Decision:
        requests = view.load.requests
        worker = min(view.candidates, key=requests)
        return Decision(
            worker, view.overlap(request.block_hashes).get(worker, 0), float(requests(worker)), "least_loaded"
        )
