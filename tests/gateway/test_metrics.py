"""The gateway's metrics: per-worker series looked up once, and gone with their worker."""

from __future__ import annotations

from gateway.metrics import GatewayMetrics


def test_a_worker_series_is_gone_with_its_worker_and_back_with_it() -> None:
    metrics = GatewayMetrics()
    metrics.of_worker(metrics.event_lag, "w-1").set(0.25)
    assert metrics.of_worker(metrics.event_lag, "w-1") is metrics.of_worker(metrics.event_lag, "w-1")
    assert b'kvgate_worker_event_lag_seconds{worker="w-1"} 0.25' in metrics.render()
    metrics.forget_worker("w-1")
    assert b'worker="w-1"' not in metrics.render()
    metrics.of_worker(metrics.event_lag, "w-1").set(0.5)  # the worker is back: its series with it
    assert b'kvgate_worker_event_lag_seconds{worker="w-1"} 0.5' in metrics.render()
