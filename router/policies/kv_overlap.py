"""`kv_overlap`: Dynamo's KV router cost (docs/router/kv_cache_routing.md), as published.

`logit = overlap_score_weight x prefill_blocks + decode_blocks`, with
`prefill_blocks = (active_prefill_tokens + ISL - overlap x block_size) / block_size` and `decode_blocks`
the blocks of the worker's active requests. Temperature 0: the lowest logit wins; ties go to the worker
with the smaller tree (fewer indexed blocks), then at random. With a temperature above 0 it samples
from the softmax of the negated, normalised logits instead.
"""

from __future__ import annotations

import math

from router.policies.base import Policy, RouterView
from router.request import Decision, RouteRequest


class KvOverlap(Policy):
    name = "kv_overlap"

    def pick(self, request: RouteRequest, view: RouterView) -> Decision:
        overlap = view.overlap(request.block_hashes)
        load = view.load
        now = view.now
        bs = view.block_size
        weight = self.config.overlap_score_weight
        isl = request.num_tokens
        logits: dict[str, float] = {}
        for w in view.candidates:
            prefill_blocks = (load.queued_prefill(w, now) + isl - overlap.get(w, 0) * bs) / bs
            logits[w] = weight * prefill_blocks + load.active_blocks(w)
        worker = self._select(logits, view)
        matched = overlap.get(worker, 0)
        return Decision(worker, matched, logits[worker], "overlap" if matched else "load")

    def _select(self, logits: dict[str, float], view: RouterView) -> str:
        temperature = self.config.kv_temperature
        if temperature > 0:
            return self._sample(logits, temperature)
        best = min(logits.values())
        tied = [w for w, v in logits.items() if v == best]
        if len(tied) > 1:
            smallest = min(view.tree_size(w) for w in tied)
            tied = [w for w in tied if view.tree_size(w) == smallest]
        return tied[0] if len(tied) == 1 else self.rng.choice(tied)

    def _sample(self, logits: dict[str, float], temperature: float) -> str:
        values = list(logits.values())
        lo, hi = min(values), max(values)
        span = hi - lo or 1.0
        weights = [math.exp(-(v - lo) / span / temperature) for v in values]
        return self.rng.choices(list(logits), weights=weights)[0]
