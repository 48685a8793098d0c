"""The gateway's metrics: per-worker series looked up once, and gone with their worker; the per-request
counters counted aside and in their series at every collection; the histograms kept aside exposed as
prometheus-client's own."""

from __future__ import annotations

import random
import re
import time

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from gateway.metrics import AsideHistogram, GatewayMetrics


def test_a_worker_series_is_gone_with_its_worker_and_back_with_it() -> None:
    metrics = GatewayMetrics()
    metrics.of_worker(metrics.event_lag, "w-1").set(0.25)
    assert metrics.of_worker(metrics.event_lag, "w-1") is metrics.of_worker(metrics.event_lag, "w-1")
    assert b'kvgate_worker_event_lag_seconds{worker="w-1"} 0.25' in metrics.render()
    metrics.forget_worker("w-1")
    assert b'worker="w-1"' not in metrics.render()
    metrics.of_worker(metrics.event_lag, "w-1").set(0.5)  # the worker is back: its series with it
    assert b'kvgate_worker_event_lag_seconds{worker="w-1"} 0.5' in metrics.render()


def test_a_flood_of_worker_ids_leaves_only_the_live_workers_series() -> None:
    # worker ids come and go (a pod's name per rollout): every per-worker series leaves with its worker
    metrics = GatewayMetrics()
    for n in range(1000):
        worker = f"w-{n}"
        for gauge in (metrics.inflight, metrics.worker_running, metrics.worker_waiting):
            gauge.labels(worker).set(1)
        for gauge in (metrics.worker_kv_usage, metrics.event_lag, metrics.approximate):
            metrics.of_worker(gauge, worker).set(1)
        metrics.state_dumps.labels(worker).inc()
        if n != 999:
            metrics.forget_worker(worker)
    page = metrics.render().decode()
    assert set(re.findall(r'worker="([^"]*)"', page)) == {"w-999"}
    assert 'kvgate_state_dumps_total{worker="w-999"} 1.0' in page
    assert len(metrics._per_worker) == 3


def test_per_request_counts_are_in_their_series_at_every_collection() -> None:
    metrics = GatewayMetrics()
    value = metrics.registry.get_sample_value
    assert value("kvgate_prompt_tokens_total") == 0.0
    for _ in range(3):
        metrics.count_request("/v1/chat/completions", 200)
    metrics.count_request("other", 404)
    metrics.count_decision("session_kv", "overlap")
    metrics.record_usage(100, 40, 10)
    assert value("kvgate_requests_total", {"endpoint": "/v1/chat/completions", "status": "200"}) == 3.0
    assert value("kvgate_requests_total", {"endpoint": "other", "status": "404"}) == 1.0
    assert value("kvgate_routing_decisions_total", {"policy": "session_kv", "reason": "overlap"}) == 1.0
    metrics.count_request("/v1/chat/completions", 200)
    metrics.record_usage(50, 20, 0)  # a second collection adds only what came since the first
    page = metrics.render().decode()
    assert 'kvgate_requests_total{endpoint="/v1/chat/completions",status="200"} 4.0' in page
    assert "kvgate_prompt_tokens_total 150.0" in page and "kvgate_cached_tokens_total 60.0" in page
    assert 'kvgate_tier_cached_tokens_total{tier="device"} 50.0' in page
    assert 'kvgate_tier_cached_tokens_total{tier="host"} 10.0' in page
    assert "kvgate_cache_hit_ratio 0.4" in page


@pytest.mark.parametrize("buckets", [(0.005, 0.01, 0.5, 1, 60), (0, 16, 64, 65536)])
def test_an_aside_histogram_is_exposed_as_prometheus_clients_histogram(buckets: tuple[float, ...]) -> None:
    rng = random.Random(7)
    amounts = [rng.choice(buckets) for _ in range(50)] + [rng.uniform(0, 2 * buckets[-1]) for _ in range(500)]
    aside_registry, plain_registry = CollectorRegistry(), CollectorRegistry()
    aside = AsideHistogram("kvgate_h", "doc", buckets, aside_registry)
    plain = Histogram("kvgate_h", "doc", buckets=buckets, registry=plain_registry)
    for amount in amounts:  # the bounds themselves too: a bucket holds what is <= its bound
        aside.observe(amount)
        plain.observe(amount)

    def page(registry: CollectorRegistry) -> list[str]:
        return [line for line in generate_latest(registry).decode().splitlines() if "_created " not in line]

    assert page(aside_registry) == page(plain_registry)
    assert aside_registry.get_sample_value("kvgate_h_created") == pytest.approx(time.time(), abs=60)
