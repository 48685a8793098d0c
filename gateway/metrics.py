"""The gateway's Prometheus metrics, on a registry of its own (two gateways in one process never mix).

The counters every request moves (requests, decisions, usage: six a request) are counted in plain
ints and added to their prometheus-client counters when the registry is collected (a scrape, or
`get_sample_value`): each `inc` takes a lock, and a turn's six cost 2.7 us against 0.5 now
(docs/EXPERIMENTS.md, "Gateway CPU, fourth pass"). A collection sees every count made before it.
The histograms a turn observes (three, and one a streamed write) are kept so too (`AsideHistogram`).
"""

from __future__ import annotations

import itertools
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from router.hold_stats import HoldStats

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


class AsideHistogram:
    """A histogram without labels, observed in a plain list and float and exposed when the registry is
    collected, as prometheus-client's `Histogram` exposes one (buckets, count, sum, created): its
    `observe` takes a lock for the bucket and one for the sum, ~1.0 us against ~0.25 here, and a turn
    observes three or more (docs/EXPERIMENTS.md, "Gateway CPU, fifth pass")."""

    def __init__(
        self, name: str, documentation: str, buckets: Sequence[float], registry: CollectorRegistry
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = [float(b) for b in buckets]  # upper bounds, ascending; +Inf is the last count
        self._les = [*map(floatToGoString, self._bounds), "+Inf"]
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0
        self._created = time.time()
        registry.register(self)

    def observe(self, amount: float) -> None:
        self._counts[bisect_left(self._bounds, amount)] += 1  # the first bound >= amount, as `Histogram`
        self._sum += amount

    def describe(self) -> Iterable[Any]:
        return [HistogramMetricFamily(self._name, self._documentation)]

    def collect(self) -> Iterable[Any]:
        family = HistogramMetricFamily(self._name, self._documentation)
        cumulative = [float(n) for n in itertools.accumulate(self._counts)]
        family.add_metric([], list(zip(self._les, cumulative, strict=True)), self._sum)
        family.samples.append(Sample(self._name + "_created", {}, self._created))
        return [family]


class RouterHoldCollector:
    """The router's holds, read when the registry is collected: how many requests each ever held, how
    many of those left by its bound, how long the let-go ones waited, and how many wait now at each
    stage (before the pick, and picked but waiting for their worker's room)."""

    def __init__(
        self, stats: Callable[[], dict[str, HoldStats]], waiting: Callable[[], dict[str, int]]
    ) -> None:
        self._stats = stats
        self._waiting = waiting

    def describe(self) -> Iterable[Any]:
        return []  # collected fresh each time; nothing to check at registration

    def collect(self) -> Iterable[Any]:
        held = CounterMetricFamily(
            "kvgate_router_held", "Requests the router ever held, by hold", labels=["hold"]
        )
        overdue = CounterMetricFamily(
            "kvgate_router_held_overdue", "Held requests let go by the hold's bound", labels=["hold"]
        )
        seconds = CounterMetricFamily(
            "kvgate_router_hold_seconds", "Seconds the let-go requests waited, in all", labels=["hold"]
        )
        for name, stats in self._stats().items():
            held.add_metric([name], stats.held_total)
            overdue.add_metric([name], stats.overdue_total)
            seconds.add_metric([name], stats.hold_s)
        waiting = GaugeMetricFamily(
            "kvgate_router_holding", "Requests waiting at the router now, by stage", labels=["stage"]
        )
        for stage, count in self._waiting().items():
            waiting.add_metric([stage], count)
        return [held, overdue, seconds, waiting]


class GatewayMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        r.register(_FlushFirst(self._flush))
        # registered in this order, and exposed so
        self._add_request_metrics(r)
        self._add_routing_metrics(r)
        self._add_cache_metrics(r)
        self._add_event_counters(r)
        self._add_pool_metrics(r)
        self._count_aside()

    def _add_request_metrics(self, r: CollectorRegistry) -> None:
        self.requests = Counter(
            "kvgate_requests", "Requests answered, by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.ttft = AsideHistogram(
            "kvgate_ttft_seconds", "Time to first token through the gateway", _LATENCY_BUCKETS, r
        )
        self.itl = AsideHistogram(
            "kvgate_inter_token_latency_seconds", "Gap between streamed events", _ITL_BUCKETS, r
        )
        self.e2e = AsideHistogram("kvgate_request_seconds", "Whole request duration", _LATENCY_BUCKETS, r)

    def _add_routing_metrics(self, r: CollectorRegistry) -> None:
        self.decisions = Counter(
            "kvgate_routing_decisions",
            "Routing decisions by policy and reason",
            ["policy", "reason"],
            registry=r,
        )
        self.overlap_tokens = AsideHistogram(
            "kvgate_expected_overlap_tokens",
            "Prefix tokens the chosen worker was expected to hold",
            _TOKEN_BUCKETS,
            r,
        )

    def _add_cache_metrics(self, r: CollectorRegistry) -> None:
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

    def _add_event_counters(self, r: CollectorRegistry) -> None:
        self.bad_registrations = Counter(
            "kvgate_bad_registrations", "Registry entries ignored as invalid (logged once a key)", registry=r
        )
        self.retries = Counter(
            "kvgate_retries", "Requests retried on another worker before the first byte", registry=r
        )
        self.split_turns = Counter(
            "kvgate_split_turns",
            "Turns sent as their prompt and then their decode, at a priority every prompt outranks",
            registry=r,
        )
        self.slices_cut = Counter(
            "kvgate_slices_cut",
            "Decode slices cut for a prompt that did not fit beside them (each went on as the next)",
            registry=r,
        )
        self.prefill_pieces = Counter(
            "kvgate_prefill_pieces",
            "Prefill pieces sent before a long prompt's part (the prompts sent meanwhile go in between)",
            registry=r,
        )
        self.stream_errors = Counter(
            "kvgate_stream_errors", "Streams ended by a mid-stream worker failure", registry=r
        )
        self.queued = Gauge("kvgate_queued_requests", "Requests waiting for a free worker slot", registry=r)
        self.rejected = Counter("kvgate_rejected", "Requests refused by admission (429)", registry=r)

    def _add_pool_metrics(self, r: CollectorRegistry) -> None:
        """The workers (labelled by worker id: `forget_worker` drops a worker's series) and sessions."""
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

    def _count_aside(self) -> None:
        """The hot path's counts, kept in plain ints and dicts until the next collection (`_flush`)."""
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

    def watch_holds(
        self, stats: Callable[[], dict[str, HoldStats]], waiting: Callable[[], dict[str, int]]
    ) -> None:
        """Expose the router's holds (`RouterHoldCollector`), read at each collection."""
        self.registry.register(RouterHoldCollector(stats, waiting))

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
            self.state_dumps,
        ):
            try:
                gauge.remove(worker_id)
            except KeyError:
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry)
