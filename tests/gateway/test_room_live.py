"""The router's room queue live (router/room.py, gateway.router_holds.RoomHold): a real gateway in front of
a real mock worker whose KV cache is small enough that one prompt cannot fit beside a running one."""

from __future__ import annotations

import asyncio

import openai
import pytest

from router.config import RouterConfig
from tests.gateway.conftest import Cluster
from tests.gateway.gateways import running_gateway, until

# 128 blocks of 16 tokens; the mock worker's tokenizer is a byte per token (plus the chat template)
NUM_BLOCKS = 128


def chat(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


@pytest.mark.slow
async def test_a_prompt_without_room_waits_at_the_gateway_and_a_small_one_passes_it(
    cluster: Cluster, nats_url: str, namespace: str
) -> None:
    """A long answer runs on a prompt of ~34 blocks; a prompt of ~100 blocks cannot fit beside it and
    waits at the gateway; a prompt of ~6 blocks picked after it is sent at once and finishes while the
    big one still waits (in the engine's first-come-first-served queue it would wait behind the big
    one, which waits for the long answer to end). Ordered by events, not by time."""
    cluster.worker("room0", "mock", "--num-blocks", str(NUM_BLOCKS))  # real time: ~6 ms a token
    await asyncio.to_thread(cluster.workers["room0"].wait_http, "/health", 60.0)
    config = RouterConfig(room_hold=True, room_max_hold_s=600.0)
    async with running_gateway(nats_url, namespace, "gw-room", router_config=config) as gw:
        await gw.wait_ready(workers=1)
        rooms = gw.router.rooms
        assert rooms is not None
        sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0)
        try:
            long_stream = await sdk.chat.completions.create(
                model="mock", messages=chat("a" * 500), max_tokens=700, stream=True
            )
            stream = long_stream.__aiter__()
            await stream.__anext__()  # the long answer is running
            big = asyncio.create_task(
                sdk.chat.completions.create(model="mock", messages=chat("b" * 1600), max_tokens=5)
            )
            await until(lambda: rooms.held == 1, 30.0, "the big prompt held at the gateway")
            small = await sdk.chat.completions.create(model="mock", messages=chat("c" * 60), max_tokens=5)
            assert small.usage is not None and small.usage.completion_tokens == 5
            assert not big.done() and rooms.held == 1  # the small one passed it
            async for _chunk in stream:  # the rest of the long answer; its end releases the big one
                pass
            reply = await asyncio.wait_for(big, 60.0)  # released when the long answer completed
            assert reply.usage is not None and reply.usage.prompt_tokens > 1600
            assert rooms.held == 0 and rooms.stats.held_total == 1 and rooms.stats.overdue_total == 0
        finally:
            await sdk.close()
