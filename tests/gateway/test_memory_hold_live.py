"""The router's memory hold live (router/memory_hold.py through gateway.router_holds.RoomHold): a real
gateway in front of a real mock worker whose KV cache is small enough that one prompt cannot fit beside
a running one, as its load reports and the router's predicted wait for memory tell.

The big prompt is sent as soon as a report shows the long answer running: on a quiet machine that
report is often one taken before the worker's first decode step ended, with no decode speed measured
yet (the first decode of a fresh worker), which the router must not read as "no wait"
(RouterConfig.default_decode_step_ms)."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import openai
import pytest

from router.config import RouterConfig
from tests.gateway.conftest import Cluster
from tests.gateway.gateways import running_gateway, until

# 128 blocks of 16 tokens; the mock worker's tokenizer is a byte per token (plus the chat template)
NUM_BLOCKS = 128


async def scrape(url: str) -> str:
    """The gateway's /metrics text."""
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        return await resp.text()


def chat(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


@pytest.mark.slow
async def test_a_prompt_predicted_to_wait_for_memory_waits_at_the_gateway_and_a_small_one_passes_it(
    cluster: Cluster, nats_url: str, namespace: str
) -> None:
    """A long answer runs on a prompt of ~34 blocks; a prompt of ~100 blocks would wait for it to end
    (predicted from the worker's report and the answer's max_tokens) and waits at the gateway; a prompt
    of ~6 blocks picked after it is sent at once and finishes while the big one still waits (in the
    engine's first-come-first-served queue it would wait behind the big one). Ordered by events."""
    cluster.worker("hold0", "mock", "--num-blocks", str(NUM_BLOCKS))  # real time: ~6 ms a token
    await asyncio.to_thread(cluster.workers["hold0"].wait_http, "/health", 60.0)
    config = RouterConfig(memory_hold=True, memory_hold_max_s=600.0)
    async with running_gateway(nats_url, namespace, "gw-hold", router_config=config) as gw:
        await gw.wait_ready(workers=1)
        hold = gw.router.memory_hold
        assert hold is not None
        sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0)
        try:
            long_stream = await sdk.chat.completions.create(
                model="mock", messages=chat("a" * 500), max_tokens=1200, stream=True
            )
            stream = long_stream.__aiter__()
            await stream.__anext__()  # the long answer is running
            loads = gw.router.load.workers

            def reported_running() -> bool:
                report = next(iter(loads.values())).report
                return report is not None and report.running == 1 and report.used_blocks > 30

            await until(reported_running, 30.0, "a load report with the long answer running")
            big = asyncio.create_task(
                sdk.chat.completions.create(model="mock", messages=chat("b" * 1600), max_tokens=5)
            )
            await until(lambda: hold.held == 1, 30.0, "the big prompt held at the gateway")
            small = await sdk.chat.completions.create(model="mock", messages=chat("c" * 60), max_tokens=5)
            assert small.usage is not None and small.usage.completion_tokens == 5
            assert not big.done() and hold.held == 1  # the small one passed it
            assert 'kvgate_router_holding{stage="for_room"} 1.0' in await scrape(gw.url)
            async for _chunk in stream:  # the rest of the long answer; its end releases the big one
                pass
            reply = await asyncio.wait_for(big, 60.0)
            assert reply.usage is not None and reply.usage.prompt_tokens > 1600
            assert hold.held == 0 and hold.stats.held_total == 1 and hold.stats.overdue_total == 0
            text = await scrape(gw.url)  # what an operator sees of it
            assert 'kvgate_router_held_total{hold="memory"} 1.0' in text
            assert 'kvgate_router_held_overdue_total{hold="memory"} 0.0' in text
            assert 'kvgate_router_holding{stage="for_room"} 0.0' in text
            waited = re.search(r'^kvgate_router_hold_seconds_total\{hold="memory"\} (\S+)$', text, re.M)
            assert waited is not None and float(waited.group(1)) > 0
        finally:
            await sdk.close()
