"""`cache_aware`: SGLang router 0.3.2's cache-aware policy (sgl-model-gateway `src/policies/cache_aware.rs`
and `tree.rs` at the `[smg] release 0.3.2` commit), with its Python CLI defaults. Checked live against
the real router in front of kvgate's mock workers (`tests/gateway/test_sglang_router_peer.py`).

Load = requests this router sent to the worker that have not completed. If the load is imbalanced
(`max - min > balance_abs_threshold` and `max > balance_rel_threshold x min`) the least loaded worker
wins. Otherwise the longest prefix match on an approximate tree of the requests routed to each worker
(not KV events) wins when its match rate (matched / prompt tokens) exceeds `cache_threshold`; at or
below it, the least loaded worker wins as well (releases before December 2025 took the smallest tree). Among
equally loaded workers the first listed wins (Rust's `min_by_key`). Among workers with the longest
match, the one that first sent text through the deepest matched position wins: SGLang's tree answers
with the tenant that created that node (`last_tenant`, inherited when a node splits). Either way the
chosen worker's tree then takes the request. Trees lose least recently used leaves beyond
`cache_max_tree_tokens` per worker and never expire by age.

Differences, all of granularity: SGLang matches characters of the messages' text joined by spaces, this
matches blocks of tokens of the rendered prompt (a match rate within a block and the chat template's
markup of SGLang's); it trims oversized trees every 60 s, this one at once; its worker list is in its
registry's hash order, this one in registration order.
"""

from __future__ import annotations

from collections.abc import Sequence

from router.approx_index import ApproxIndex
from router.policies.base import Policy, RouterView
from router.request import Decision, RouteRequest


class CacheAware(Policy):
    name = "cache_aware"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.tree = ApproxIndex(float("inf"), self.config.cache_max_tree_tokens)
        self._first: dict[int, str] = {}  # block -> the worker whose request first brought it to a tree

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
                tied = [w for w, n in matched.items() if n == longest]
                worker, reason = self._creator(tied, chain[longest - 1]), "cache"
            else:
                worker, reason = self._first_min(loads), "least_loaded"
        if not self.tree.has_worker(worker):
            self.tree.add_worker(worker)
        self.tree.insert(worker, chain, view.now)
        self._remember(worker, chain)
        return Decision(worker, view.overlap(chain).get(worker, 0), float(loads[worker]), reason)

    def _first_min(self, loads: dict[str, int]) -> str:
        return min(loads, key=loads.__getitem__)  # SGLang's min_by_key: the first listed among ties

    def _creator(self, tied: list[str], deepest: int) -> str:
        first = self._first.get(deepest)
        if first in tied:
            return first
        # the creator's blocks left its tree: SGLang then takes whichever tenant its map yields first
        return tied[0] if len(tied) == 1 else self.rng.choice(tied)

    def _remember(self, worker: str, chain: Sequence[int]) -> None:
        first = self._first
        for h in chain:
            first.setdefault(h, worker)
        if len(first) > 2 * len(self.tree) + 1024:  # bounded: forget blocks no tree holds any more
            self._first = {h: w for h, w in first.items() if self.tree.holds(h)}

    def remove_worker(self, worker_id: str) -> None:
        self.tree.remove_worker(worker_id)

    def on_workers_changed(self, workers: Sequence[str]) -> None:
        for w in workers:
            if not self.tree.has_worker(w):
                self.tree.add_worker(w)  # SGLang inserts "" for every worker: all start at size 0
