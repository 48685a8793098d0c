"""`kv_overlap`: NVIDIA Dynamo 1.6.1's KV router as shipped (`lib/kv-router`: scheduling/selector,
sequences), checked against the real one (`tests/router/test_kv_overlap_dynamo.py`, `peers` extra).

Per candidate worker, in blocks:

    logit = overlap_score_weight x max(0, (active_prefill_tokens + ISL) / block_size - overlap)
            + potential_decode_blocks

- `overlap`: the device-tier prefix the worker holds (its KV events).
- `active_prefill_tokens`: the router's own prediction, not the worker's report: every request it sent
  there adds `ISL - overlap x block_size` at the pick and removes it at its first token.
- `potential_decode_blocks`: the distinct prompt blocks of the requests it sent there that have not
  completed (a block shared by two of them counts once), plus this prompt's blocks not among them.
  Output blocks are not tracked (Dynamo's `router_track_output_blocks` is off by default).

Temperature 0 (the default): the lowest logit wins, ties at random. Above 0: a softmax over the logits
normalised to [0, 1] (`(logit - min) / (max - min) / temperature`), sampled. The worker's load reports
play no part, as in Dynamo (they only gate its optional busy thresholds).

Two of Dynamo's settings, off by default as in Dynamo, make it the Dynamo users deploy for agents:
`kv_affinity_ttl_s` (`--router-session-affinity-ttl-secs`: a named session's requests go to the worker
its session is bound to, router/session_affinity.py) and `kv_queue` with `kv_queue_threshold` and
`kv_queue_wspt` (`--router-queue-threshold`, `--router-queue-policy fcfs|wspt`: requests wait before
their pick while every worker they may go to is busy, router/dynamo_queue.py, run by `Router`).
This policy keeps the state both read: the bindings, and the prefill in flight per worker
(`prefill_tokens`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

from router.config import RouterConfig
from router.policies.active_blocks import ActiveBlocks
from router.policies.base import Policy, RouterView
from router.request import Decision, RouteRequest, is_inferred
from router.session_affinity import SessionAffinity

# Dynamo's stale-request guard (sequences/single.rs EXPIRY_DURATION): a request whose completion never
# arrives stops counting after this long.
EXPIRY_S = 3600.0


class _Active(ActiveBlocks):
    """One worker's in-flight requests as Dynamo's router tracks them: their blocks and the prefill
    tokens of those without a first token yet."""

    __slots__ = ("prefill_tokens",)

    def __init__(self) -> None:
        super().__init__()
        self.prefill_tokens = 0


class _Flight:
    __slots__ = ("chain", "picked_at", "prefill_tokens", "worker_id")

    def __init__(self, worker_id: str, chain: Sequence[int], prefill_tokens: int, picked_at: float) -> None:
        self.worker_id = worker_id
        self.chain = chain
        self.prefill_tokens = prefill_tokens  # until the first token; 0 after it
        self.picked_at = picked_at


class KvOverlap(Policy):
    name = "kv_overlap"

    def __init__(self, config: RouterConfig, rng: random.Random) -> None:
        super().__init__(config, rng)
        self._active: dict[str, _Active] = {}
        self._flights: dict[str, _Flight] = {}  # insertion order is pick order (expiry)
        ttl = config.kv_affinity_ttl_s
        self.affinity: SessionAffinity | None = SessionAffinity(ttl) if ttl > 0 else None

    def pick(self, request: RouteRequest, view: RouterView) -> Decision:
        overlap = view.overlap(request.block_hashes)
        bound = self.affinity_target(request, view.now, view.candidates.__contains__)
        if bound is not None:  # hard affinity: the binding is the request's pinned worker
            logit = self.logits(request, view, overlap, (bound,))[bound]
            return Decision(bound, overlap.get(bound, 0), logit, "session")
        logits = self.logits(request, view, overlap)
        worker = self._select(logits)
        matched = overlap.get(worker, 0)
        return Decision(worker, matched, logits[worker], "overlap" if matched else "load")

    def affinity_target(self, request: RouteRequest, now: float, live: Callable[[str], bool]) -> str | None:
        """The worker the request's session is bound to (a lease taken on it until the request ends),
        or None: no affinity, a session the client did not name, or one to bind at this pick."""
        sid = request.session_id
        if self.affinity is None or sid is None or is_inferred(sid):
            return None
        return self.affinity.target(request.request_id, sid, now, live)

    def prefill_tokens(self, worker_id: str) -> int:
        """Prefill tokens in flight on the worker by this router's count (Dynamo's active prefill
        tokens: the router queue's busy test)."""
        active = self._active.get(worker_id)
        return active.prefill_tokens if active is not None else 0

    def logits(
        self,
        request: RouteRequest,
        view: RouterView,
        overlap: dict[str, int],
        workers: Sequence[str] | None = None,
    ) -> dict[str, float]:
        """The cost of each of `workers` (the candidates when None)."""
        chain = request.block_hashes
        bs = view.block_size
        weight = self.config.overlap_score_weight
        isl = request.num_tokens
        logits: dict[str, float] = {}
        for w in view.candidates if workers is None else workers:
            active = self._active.get(w)
            if active is None:
                active = self._active[w] = _Active()
            prefill_blocks = (active.prefill_tokens + isl) / bs - overlap.get(w, 0)
            logits[w] = weight * max(0.0, prefill_blocks) + active.potential_blocks(chain)
        return logits

    def _select(self, logits: dict[str, float]) -> str:
        temperature = self.config.kv_temperature
        if temperature > 0:
            return self._sample(logits, temperature)
        best = min(logits.values())
        tied = [w for w, v in logits.items() if v == best]
        return tied[0] if len(tied) == 1 else self.rng.choice(tied)

    def _sample(self, logits: dict[str, float], temperature: float) -> str:
        values = list(logits.values())
        lo, hi = min(values), max(values)
        if lo == hi:
            return self.rng.choice(list(logits))
        scale = 1.0 / ((hi - lo) * temperature)
        weights = [math.exp(-(v - lo) * scale) for v in values]
        return self.rng.choices(list(logits), weights=weights)[0]

    # --- the router's tracking of in-flight requests (Dynamo: add at pick, prefill off at the first
    # token, blocks off at completion)

    def on_pick(
        self, request: RouteRequest, decision: Decision, block_size: int, now: float, one_shot: bool
    ) -> None:
        rid = request.request_id
        if rid in self._flights:
            self.on_complete(rid)  # a reused id: the old request is over
        if len(self._flights) >= self.config.max_inflight:
            self.on_complete(next(iter(self._flights)))
        w = decision.worker_id
        active = self._active.get(w)
        if active is None:
            active = self._active[w] = _Active()
        prefill = max(0, request.num_tokens - decision.overlap_blocks * block_size)
        active.add(request.block_hashes)
        active.prefill_tokens += prefill
        self._flights[rid] = _Flight(w, request.block_hashes, prefill, now)
        sid = request.session_id
        if self.affinity is not None and sid is not None and not is_inferred(sid):
            self.affinity.bind(rid, sid, w, now)  # Dynamo commits the binding once dispatched

    def on_first_token(self, request_id: str) -> None:
        f = self._flights.get(request_id)
        if f is not None and f.prefill_tokens:
            active = self._active.get(f.worker_id)
            if active is not None:
                active.prefill_tokens -= f.prefill_tokens
            f.prefill_tokens = 0

    def on_complete(self, request_id: str) -> None:
        self.on_first_token(request_id)
        f = self._flights.pop(request_id, None)
        if f is not None:
            active = self._active.get(f.worker_id)
            if active is not None:
                active.remove(f.chain)

    def on_end(self, request_id: str, now: float) -> None:
        if self.affinity is not None:
            self.affinity.release(request_id, now)  # the stream ended: the binding idles from now

    def expire(self, now: float) -> None:
        if self.affinity is not None:
            self.affinity.expire(now)
        cutoff = now - EXPIRY_S
        while self._flights:
            rid, f = next(iter(self._flights.items()))
            if f.picked_at > cutoff:
                break
            self.on_complete(rid)

    def remove_worker(self, worker_id: str) -> None:
        if self.affinity is not None:
            self.affinity.remove_worker(worker_id)
        self._active.pop(worker_id, None)
        for rid in [rid for rid, f in self._flights.items() if f.worker_id == worker_id]:
            del self._flights[rid]
