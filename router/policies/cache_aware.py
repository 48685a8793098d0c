"""`cache_aware`: SGLang router 0.3.x's cache-aware policy (sgl-router/src/policies/cache_aware.rs and
tree.rs), with its Python CLI defaults.

Load = requests this router sent to the worker that have not completed. If the load is imbalanced
(`max - min > balance_abs_threshold` and `max > balance_rel_threshold x min`) the least loaded worker
wins. Otherwise the longest prefix match on an approximate tree of the requests routed to each worker
(not KV events) wins when its match rate (matched / prompt tokens) exceeds `cache_threshold`; at or
below it, the worker with the smallest tree. Either way the chosen worker's tree then takes the request.
Trees lose least recently used leaves beyond `cache_max_tree_tokens` per worker and never expire by age.

Differences, all of granularity: SGLang matches characters of the request text, this matches blocks of
tokens (a match rate within one block of SGLang's); it trims oversized trees every 120 s, this one at
once; ties (equal matches, equal tree sizes) go to whichever worker its hash map yields first, here to
one at random.
"""

from __future__ import annotations

from collections.abc import Sequence

from router.index import ApproxIndex
from router.policies.base import Policy, RouterView
from router.request import Decision, RouteRequest


class CacheAware(Policy):
    name = "cache_aware"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tree = ApproxIndex(float("inf"), self.config.cache_max_tree_tokens)

    def pick(self, request: RouteRequest, view: RouterView) -> Decision:
        cfg = self.config
        self.tree.max_blocks = max(1, cfg.cache_max_tree_tokens // view.block_size)
        loads = {w: view.load.requests(w) for w in view.candidates}
        hi, lo = max(loads.values()), min(loads.values())
        chain = request.block_hashes
        if hi - lo > cfg.balance_abs_threshold and hi > cfg.balance_rel_threshold * lo:
            worker, reason = self._first_min(loads), "balance"
        else:
            matched = {w: n for w, n in self.tree.overlap(chain).items() if w in loads}
            longest = max(matched.values(), default=0)
            rate = longest * view.block_size / request.num_tokens if request.num_tokens else 0.0
            if rate > cfg.cache_threshold:
                worker, reason = self._choose([w for w, n in matched.items() if n == longest]), "cache"
            else:
                sizes = {w: self.tree.blocks_of(w) for w in loads}
                smallest = min(sizes.values())
                worker, reason = self._choose([w for w, n in sizes.items() if n == smallest]), "smallest_tree"
        if not self.tree.has_worker(worker):
            self.tree.add_worker(worker)
        self.tree.insert(worker, chain, view.now)
        return Decision(worker, view.overlap(chain).get(worker, 0), float(loads[worker]), reason)

    def _first_min(self, loads: dict[str, int]) -> str:
        return min(loads, key=loads.__getitem__)  # SGLang's min_by_key: the first listed among ties

    def _choose(self, tied: list[str]) -> str:
        return tied[0] if len(tied) == 1 else self.rng.choice(tied)

    def remove_worker(self, worker_id: str) -> None:
        self.tree.remove_worker(worker_id)

    def on_workers_changed(self, workers: Sequence[str]) -> None:
        for w in workers:
            if not self.tree.has_worker(w):
                self.tree.add_worker(w)  # SGLang inserts "" for every worker: all start at size 0
