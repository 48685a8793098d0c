"""`cache_aware`: SGLang model gateway's gate-and-match (sgl-model-gateway/src/policies/cache_aware.rs).

If the load is imbalanced (`max - min > balance_abs_threshold` and `max > balance_rel_threshold x min`,
load = requests in flight) the shortest queue wins. Otherwise the longest prefix match on an approximate
per-worker tree of the requests routed there (not events) wins when its match rate (matched / prompt
tokens) exceeds `cache_threshold`; below it, the least loaded worker. The chosen worker's tree then
takes the request. Block-granular here, where SGLang matches characters.
"""

from __future__ import annotations

from router.index import ApproxIndex
from router.policies.base import Policy, RouterView
from router.request import Decision, RouteRequest


class CacheAware(Policy):
    name = "cache_aware"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tree = ApproxIndex(self.config.cache_tree_ttl_s, self.config.cache_tree_blocks_per_worker)

    def pick(self, request: RouteRequest, view: RouterView) -> Decision:
        cfg = self.config
        loads = {w: view.load.requests(w) for w in view.candidates}
        least = min(loads, key=loads.__getitem__)  # first listed among ties
        hi, lo = max(loads.values()), loads[least]
        chain = request.block_hashes
        if hi - lo > cfg.balance_abs_threshold and hi > cfg.balance_rel_threshold * lo:
            worker, reason = least, "balance"
        else:
            matched = {w: n for w, n in self.tree.overlap(chain).items() if w in loads}
            best = max(loads, key=lambda w: (matched.get(w, 0), -loads[w]))
            rate = matched.get(best, 0) * view.block_size / request.num_tokens if request.num_tokens else 0.0
            worker, reason = (best, "cache") if rate > cfg.cache_threshold else (least, "least_loaded")
        if not self.tree.has_worker(worker):
            self.tree.add_worker(worker)
        self.tree.insert(worker, chain, view.now)
        return Decision(worker, view.overlap(chain).get(worker, 0), float(loads[worker]), reason)

    def remove_worker(self, worker_id: str) -> None:
        self.tree.remove_worker(worker_id)

    def expire(self, now: float) -> None:
        self.tree.expire(now)
