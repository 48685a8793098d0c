"""The worker's Prometheus metrics (`/metrics`): prompt tokens, and the cached ones by the tier they
came from, on a registry of its own (two workers in one process never mix)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class WorkerMetrics:
    def __init__(
        self, prefetched_blocks: Callable[[], int] = lambda: 0, preemptions: Callable[[], int] = lambda: 0
    ) -> None:
        """`prefetched_blocks`: the engine's count of blocks brought back from the host ahead of a turn;
        `preemptions`: its count of running requests preempted (for room, or for a waiting prompt)."""
        r = self.registry = CollectorRegistry()
        self.requests = Counter("kvgate_worker_requests", "Requests answered in full", registry=r)
        self.prompt_tokens = Counter(
            "kvgate_worker_prompt_tokens", "Prompt tokens of answered requests", registry=r
        )
        tier_cached = Counter(
            "kvgate_worker_cached_tokens",
            "Prompt tokens served from the KV cache, by tier: on the device, or onboarded from the host",
            ["tier"],
            registry=r,
        )
        tier_ratio = Gauge(
            "kvgate_worker_cache_hit_ratio",
            "Cached prompt tokens from one tier / prompt tokens, over all answered requests",
            ["tier"],
            registry=r,
        )
        self._cached = {tier: tier_cached.labels(tier) for tier in ("device", "host")}
        self._ratio = {tier: tier_ratio.labels(tier) for tier in ("device", "host")}
        self._totals = {"prompt": 0, "device": 0, "host": 0}
        prefetched = Gauge(
            "kvgate_worker_prefetched_blocks",
            "Blocks brought back from the host tier ahead of a session's turn (a gateway prefetch hint)",
            registry=r,
        )
        prefetched.set_function(prefetched_blocks)
        preempted = Gauge(
            "kvgate_worker_preemptions",
            "Running requests preempted since the worker started (their blocks freed, recomputed later)",
            registry=r,
        )
        preempted.set_function(preemptions)

    def record(
        self, prompt_tokens: int, cached_tokens: int, host_cached_tokens: int, continuation: bool = False
    ) -> None:
        """One answered request; `host_cached_tokens` are the part of `cached_tokens` onboarded. A
        `continuation` (`kvgate.output_token_ids`: the decode part of a turn a gateway split) counts as
        a request but not as a prompt: its prompt is the turn's, counted with the turn's prompt part,
        and the output so far, so the hit ratios stay the turns' as the gateway counts them."""
        device = cached_tokens - host_cached_tokens
        self.requests.inc()
        if continuation:
            return
        self.prompt_tokens.inc(prompt_tokens)
        self._cached["device"].inc(device)
        self._cached["host"].inc(host_cached_tokens)
        totals = self._totals
        totals["prompt"] += prompt_tokens
        totals["device"] += device
        totals["host"] += host_cached_tokens
        if totals["prompt"]:
            for tier in ("device", "host"):
                self._ratio[tier].set(totals[tier] / totals["prompt"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
