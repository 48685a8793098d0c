"""Two real torch workers behind the gateway: an agent session keeps its worker and its cache, and a
second session running at the same time goes to the other worker."""

from __future__ import annotations

import asyncio

import openai
import pytest

from gateway.middleware import AgentSession
from tests.gateway.conftest import Cluster, http_get

pytest.importorskip("torch")  # torch workers

pytestmark = pytest.mark.slow

SYSTEM = "You are a careful coding agent. Use the tools, then answer briefly. " * 4


async def agent(
    sdk: openai.AsyncOpenAI, model: str, name: str, turns: int
) -> tuple[set[str], list[int], list[int]]:
    session = AgentSession(sdk, session_id=name)
    # each agent its own system prompt: with a shared one, the other worker holds most of the prefix too
    # and a session may move for a few blocks' difference (session_kv's call, not what this test checks)
    messages = [
        {"role": "system", "content": f"[{name}] {SYSTEM}"},
        {"role": "user", "content": "fix the bug"},
    ]
    workers: list[str] = []
    cached: list[int] = []
    prompts: list[int] = []
    for turn in range(turns):
        with session.tool_call():
            raw = await session.client.chat.completions.with_raw_response.create(
                model=model, messages=messages, max_tokens=6, temperature=0
            )
        reply = raw.parse()
        workers.append(raw.headers["x-kvgate-worker"] + ":" + raw.headers["x-kvgate-cached-tokens-expected"])
        prompts.append(reply.usage.prompt_tokens)
        cached.append(reply.usage.prompt_tokens_details.cached_tokens)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
        messages.append(
            {"role": "tool", "tool_call_id": f"call{turn}", "content": f"output {turn} " + "y" * 120}
        )
    return workers, cached, prompts


def test_session_stays_and_hits_cache_and_a_second_session_spreads(cluster: Cluster) -> None:
    for i in range(2):
        cluster.worker(f"t{i}", "torch")
    cluster.start_gateway()
    cluster.ready(workers=2, timeout_s=180)
    model = http_get(cluster.gateway.url + "/v1/models")[1]["data"][0]["id"]
    for worker in cluster.workers.values():  # the first torch step is slow; its speed must not skew routing
        warm = openai.OpenAI(base_url=worker.url + "/v1", api_key="none", max_retries=0, timeout=120)
        warm.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "warm up " * 40}], max_tokens=2
        )

    async def run() -> list[tuple[list[str], list[int], list[int]]]:
        sdk = openai.AsyncOpenAI(
            base_url=cluster.gateway.url + "/v1", api_key="none", max_retries=0, timeout=120
        )
        try:
            return await asyncio.gather(agent(sdk, model, "alpha", 5), agent(sdk, model, "beta", 5))
        finally:
            await sdk.close()

    (workers_a, cached_a, prompts_a), (workers_b, cached_b, prompts_b) = asyncio.run(run())
    on_a = {w.split(":")[0] for w in workers_a}
    on_b = {w.split(":")[0] for w in workers_b}
    assert len(on_a) == 1 and len(on_b) == 1, (workers_a, workers_b)
    assert on_a != on_b, "the second busy session did not spread to the other worker"
    for cached, prompts in ((cached_a, prompts_a), (cached_b, prompts_b)):
        for turn in range(1, 5):
            assert cached[turn] >= 0.9 * prompts[turn - 1], (cached, prompts)
