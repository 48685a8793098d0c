"""The gateway's Prometheus metrics, on a registry of its own (two gateways in one process never mix).

The counters every request moves (requests, decisions, usage: six a request) are counted in plain
ints and added to their prometheus-client counters when the registry is collected (a scrape, or
`get_sample_value`): each `inc` takes a lock, and a turn's six cost 2.7 us against 0.5 now
(docs/EXPERIMENTS.md, "Gateway CPU, fourth pass"). A collection sees every count made before it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_TOKEN_BUCKETS = (0, 16, 64, 256, 1024, 4096, 16384, 65536, 262144)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _FlushFirst:
    """A collector of nothing, registered first: each collection of the registry starts with it, so
    the counts kept aside are in the counters before these are read."""

    def __init__(self, flush: Callable[[], None]) -> None:
        self._flush = flush

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        self._flush()
        return []


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        r.register(_FlushFirst(self._flush))
        self.requests = Counter(
            "kvgate_requests", "Requests answered, by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.ttft = Histogram(
            "kvgate_ttft_seconds",
            "Time to first token through the gateway",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "kvgate_inter_token_latency_seconds",
            "Gap between streamed events",
            buckets=_ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "kvgate_request_seconds", "Whole request duration", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.decisions = Counter(
            "kvgate_routing_decisions",
            "Routing decisions by policy and reason",
            ["policy", "reason"],
            registry=r,
        )
        self.overlap_tokens = Histogram(
            "kvgate_expected_overlap_tokens",
            "Prefix tokens the chosen worker was expected to hold",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("kvgate_prompt_tokens", "Prompt tokens reported by workers", registry=r)
        self.cached_tokens = Counter(
            "kvgate_cached_tokens", "Cached prompt tokens reported by workers", registry=r
        )
        self.cache_hit_ratio = Gauge(
            "kvgate_cache_hit_ratio", "cached_tokens / prompt_tokens over all completed requests", registry=r
        )
        self.tier_cached_tokens = Counter(
            "kvgate_tier_cached_tokens",
            "Cached prompt tokens reported by workers, by the tier they came from (device, host)",
            ["tier"],
            registry=r,
        )
        self.tier_hit_ratio = Gauge(
            "kvgate_tier_cache_hit_ratio",
            "Cached prompt tokens from one tier / prompt tokens, over all completed requests",
            ["tier"],
            registry=r,
        )
        self.bad_registrations = Counter(
            "kvgate_bad_registrations", "Registry entries ignored as invalid (logged once a key)", registry=r
        )
        self.retries = Counter(
            "kvgate_retries", "Requests retried on another worker before the first byte", registry=r
        )
        self.stream_errors = Counter(
            "kvgate_stream_errors", "Streams ended by a mid-stream worker failure", registry=r
        )
        self.queued = Gauge("kvgate_queued_requests", "Requests waiting for a free worker slot", registry=r)
        self.rejected = Counter("kvgate_rejected", "Requests refused by admission (429)", registry=r)
        self.inflight = Gauge(
            "kvgate_worker_inflight", "Requests in flight per worker", ["worker"], registry=r
        )
        self.worker_running = Gauge(
            "kvgate_worker_running", "Running sequences (load report)", ["worker"], registry=r
        )
        self.worker_waiting = Gauge(
            "kvgate_worker_waiting", "Waiting sequences (load report)", ["worker"], registry=r
        )
        self.worker_kv_usage = Gauge(
            "kvgate_worker_kv_usage", "Used / total KV blocks (load report)", ["worker"], registry=r
        )
        self.event_lag = Gauge(
            "kvgate_worker_event_lag_seconds",
            "Age of the last KV event batch on arrival",
            ["worker"],
            registry=r,
        )
        self.approximate = Gauge(
            "kvgate_worker_approximate_mode",
            "1 when a worker's KV events do not arrive and it is routed approximately",
            ["worker"],
            registry=r,
        )
        self.approximate_workers = Gauge(
            "kvgate_approximate_workers", "Workers routed in approximate mode", registry=r
        )
        self.workers = Gauge("kvgate_workers", "Live workers in the routing view", registry=r)
        self.sessions = Gauge("kvgate_live_sessions", "Sessions seen in the last session TTL", registry=r)
        self.state_dumps = Counter(
            "kvgate_state_dumps", "State dumps requested after a sequence gap", ["worker"], registry=r
        )
        self._prompt_total = 0
        self._cached_total = 0
        self._host_total = 0
        self._flushed_usage = (0, 0, 0)  # (prompt, cached, host) totals already in the counters
        self._device_cached = self.tier_cached_tokens.labels("device")
        self._host_cached = self.tier_cached_tokens.labels("host")
        # the ratios are worked out when scraped, not set on every answer (three locked sets a request)
        self.cache_hit_ratio.set_function(lambda: self._ratio(self._cached_total))
        self.tier_hit_ratio.labels("device").set_function(
            lambda: self._ratio(self._cached_total - self._host_total)
        )
        self.tier_hit_ratio.labels("host").set_function(lambda: self._ratio(self._host_total))
        # counted here until the next collection, by label values (a few endpoints, statuses, reasons)
        self._request_counts: dict[tuple[str, int], int] = {}
        self._decision_counts: dict[tuple[str, str], int] = {}
        # labelled children, looked up once: `labels()` costs a lock and a tuple per call on the hot path
        self._per_worker: dict[tuple[Gauge, str], Any] = {}  # (gauge, worker id) -> its child

    def count_request(self, endpoint: str, status: int) -> None:
        key = (endpoint, status)
        self._request_counts[key] = self._request_counts.get(key, 0) + 1

    def count_decision(self, policy: str, reason: str) -> None:
        key = (policy, reason)
        self._decision_counts[key] = self._decision_counts.get(key, 0) + 1

    def of_worker(self, gauge: Gauge, worker_id: str) -> Any:
        """`gauge.labels(worker_id)`, looked up once per worker (a KV batch sets one per message);
        `forget_worker` drops them with the worker's series."""
        child = self._per_worker.get((gauge, worker_id))
        if child is None:
            child = self._per_worker[gauge, worker_id] = gauge.labels(worker_id)
        return child

    def record_usage(self, prompt_tokens: int, cached_tokens: int, host_cached_tokens: int = 0) -> None:
        """One answer's usage; `host_cached_tokens` (part of `cached_tokens`) were onboarded from the
        worker's host tier, the rest were on its device."""
        self._prompt_total += prompt_tokens
        self._cached_total += cached_tokens
        self._host_total += host_cached_tokens

    def _flush(self) -> None:
        """The counts kept since the last collection, into their counters."""
        requests, self._request_counts = self._request_counts, {}
        for (endpoint, status), n in requests.items():
            self.requests.labels(endpoint, str(status)).inc(n)
        decisions, self._decision_counts = self._decision_counts, {}
        for (policy, reason), n in decisions.items():
            self.decisions.labels(policy, reason).inc(n)
        prompt, cached, host = self._prompt_total, self._cached_total, self._host_total
        was_prompt, was_cached, was_host = self._flushed_usage
        self._flushed_usage = (prompt, cached, host)
        self.prompt_tokens.inc(prompt - was_prompt)
        self.cached_tokens.inc(cached - was_cached)
        self._device_cached.inc((cached - host) - (was_cached - was_host))
        self._host_cached.inc(host - was_host)

    def _ratio(self, tokens: int) -> float:
        """`tokens` over the prompt tokens of every answer so far (0 before any)."""
        return tokens / self._prompt_total if self._prompt_total > 0 else 0.0

    def forget_worker(self, worker_id: str) -> None:
        for key in [key for key in self._per_worker if key[1] == worker_id]:
            del self._per_worker[key]
        for gauge in (
            self.inflight,
            self.worker_running,
            self.worker_waiting,
            self.worker_kv_usage,
            self.event_lag,
            self.approximate,
        ):
            try:
                gauge.remove(worker_id)
            except KeyError:
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry)
