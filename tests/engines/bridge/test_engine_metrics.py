"""An engine's Prometheus page turned into load reports: parsed (vLLM's and SGLang's names) and
published on the bus by a running bridge."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from engines.bridge import parse_metrics
from router.hashing import block_hashes
from router.protocol import BlockStored, LoadReport
from tests.engines.bridge.conftest import BusTap, running_bridge
from tests.engines.bridge.engine_wire import TOKENS, B, EnginePublisher, map_batch, stored
from tests.serving import serving


def vllm_metrics_page(running: int, waiting: int, usage: float, prompt: int, generated: int = 0) -> bytes:
    registry = CollectorRegistry()
    labels = ["model_name", "engine"]
    Gauge("vllm:num_requests_running", "", labels, registry=registry).labels("m", "0").set(running)
    Gauge("vllm:num_requests_waiting", "", labels, registry=registry).labels("m", "0").set(waiting)
    Gauge("vllm:kv_cache_usage_perc", "", labels, registry=registry).labels("m", "0").set(usage)
    Counter("vllm:prompt_tokens", "", labels, registry=registry).labels("m", "0").inc(prompt)
    Counter("vllm:generation_tokens", "", labels, registry=registry).labels("m", "0").inc(generated)
    info = Gauge("vllm:cache_config_info", "", ["block_size", "num_gpu_blocks"], registry=registry)
    info.labels("16", "2000").set(1)
    return generate_latest(registry)


async def next_load(
    tap: BusTap, want: Callable[[LoadReport], bool], earlier: set[tuple[int, int]]
) -> LoadReport:
    """The first load report `want` accepts; those before it may only carry an earlier state (the
    Publisher reports on its own clock: it repeats the last scrape's load until the next one)."""
    while not want(report := await asyncio.wait_for(tap.loads.get(), 30)):
        assert (report.running, report.waiting) in earlier, report
    return report


async def test_load_reports_from_engine_metrics(
    engine: EnginePublisher, tap: BusTap, nats_url: str, namespace: str
) -> None:
    # The engine's page changes only when the test has seen the bus report the previous one: the bridge
    # scrapes and the Publisher reports on two clocks, so a page served for one scrape only could be
    # replaced before any report carried it.
    seen_first = asyncio.Event()
    later_scrapes = itertools.count()

    async def metrics(_: web.Request) -> web.Response:
        if not seen_first.is_set():
            return web.Response(body=vllm_metrics_page(3, 2, 0.25, 1000), content_type="text/plain")
        # each later scrape finds 2000 more prompt tokens than the one before
        page = vllm_metrics_page(4, 1, 0.5, 3000 + 2000 * next(later_scrapes), 50)
        return web.Response(body=page, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    async with (
        serving(app) as url,
        running_bridge(engine, nats_url, namespace, replay=False, url=url, metrics_interval_s=0.05),
    ):
        await engine.send(map_batch(stored([1], None, TOKENS[:B])))
        assert await tap.events(1) == [BlockStored(block_hashes(TOKENS[:B], B), None, "device")]
        first = await next_load(tap, lambda r: r.running != 0, {(0, 0)})  # (0, 0): before a scrape
        seen_first.set()
        second = await next_load(tap, lambda r: r.running == 4, {(0, 0), (3, 2)})
        # Tokens were generated and nothing new was cached: the next heartbeat says events still
        # flow with an empty batch, so the gateway keeps routing this worker on its events.
        alive = await asyncio.wait_for(tap.batches.get(), 30)
        assert alive.events == []
    assert (first.running, first.waiting, first.used_blocks, first.total_blocks) == (3, 2, 500, 2000)
    assert (second.running, second.waiting, second.used_blocks) == (4, 1, 1000)
    assert second.prefill_tok_s > 0  # 2000 prompt tokens between any two scrapes


def test_parse_sglang_metrics() -> None:
    registry = CollectorRegistry()
    Gauge("sglang:num_running_reqs", "", ["model_name"], registry=registry).labels("m").set(5)
    Gauge("sglang:num_queue_reqs", "", ["model_name"], registry=registry).labels("m").set(7)
    Gauge("sglang:token_usage", "", ["model_name"], registry=registry).labels("m").set(0.125)
    metrics = parse_metrics(generate_latest(registry).decode())
    assert (metrics.running, metrics.waiting, metrics.kv_usage, metrics.num_blocks) == (5, 7, 0.125, 0)
