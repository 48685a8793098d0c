"""Live: a sub-agent forked beside its parent's running turn, through the real gateway (its aiohttp app on
a loopback port) to two real `kvgate worker --engine mock` processes over a real nats-server, goes with
its parent when its new blocks fit there (`RouterConfig.parent_prefix_in_use`), whether the child names
its parent (`x-parent-session-id`) or the gateway infers it (its first prompt extends the parent's).

The parent's turn (a ~400-block prompt on workers of 512 blocks) streams a long answer and is held open:
it runs on its worker `a`, whose report counts its blocks as in use. The child's prompt is the parent's
plus ~80 blocks. Counted whole, the child's ~480 blocks do not fit beside the parent's ~400 on `a`, the
in-flight pressure prices the wait for memory and the child prefills all of it on the idle worker; the
~400 its parent's turn holds take no new blocks, so with the rule it goes with its parent and prefills
~80. Which worker served a turn is the worker's own word (`x-kvgate-served-by`)."""

from __future__ import annotations

import asyncio
from typing import Any

import nats
import openai
import pytest

from router.config import RouterConfig
from router.protocol import Subjects
from tests.gateway.conftest import Cluster
from tests.gateway.gateways import RunningGateway, running_gateway
from tests.gateway.live_routes import WorkerCaches, chat, text
from tests.polling import until

pytestmark = pytest.mark.slow

WORKERS = ("sa", "sb")
BS = 16  # the mock worker's block size; its tokenizer is one token per byte
NUM_BLOCKS = 512
PARENT, ANSWER, TASK = 6400, 800, 480  # characters: ~400 blocks, then the child's ~80 more
SERVED_BY = "x-kvgate-served-by"


async def settle(gw: RunningGateway, caches: WorkerCaches, running: dict[str, int]) -> None:
    """The gateway's in-flight counts and the workers' latest load reports are `running`, and it has
    heard every block the workers hold."""
    router = gw.router

    async def quiet() -> bool:
        for w in WORKERS:
            report = router.load.workers[w].report
            busy = report.running + report.waiting if report is not None else -1
            if router.load.requests(w) != running.get(w, 0) or busy != running.get(w, 0):
                return False
        return True

    await until(quiet, 60.0, "in-flight counts and load reports")
    held = await caches.holdings()

    async def heard() -> bool:
        return all(held[w] <= gw.blocks(w) for w in WORKERS)

    await until(heard, 60.0, "the workers' KV events at the gateway")


async def fork(gw: RunningGateway, caches: WorkerCaches, tag: str, named: bool) -> tuple[str, str]:
    """The parent's turn held open on its worker, then the child's first turn: (parent's, child's) worker."""
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0, timeout=120)
    parent = chat(("system", text(f"{tag}P", PARENT)), ("user", text("Qa", 160)))
    held = await client.chat.completions.create(
        model="mock",
        messages=parent,
        max_tokens=1500,  # ~0.3 s a token at --speedup 0.1: it runs far longer than this test
        stream=True,
        extra_headers={"x-session-id": f"{tag}-parent"},
    )
    try:
        a = held.response.headers[SERVED_BY]
        async for chunk in held:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        await settle(gw, caches, {a: 1})
        # the parent's turn holds its prompt's blocks on `a`: the report says so
        report = gw.router.load.workers[a].report
        assert report is not None and report.used_blocks >= PARENT // BS
        child = [*parent, *chat(("assistant", text("Ab", ANSWER)), ("user", text("Tc", TASK)))]
        headers = {"x-session-id": f"{tag}-child"}
        if named:
            headers["x-parent-session-id"] = f"{tag}-parent"
        response = await client.chat.completions.with_raw_response.create(
            model="mock", messages=child, max_tokens=2, extra_headers=headers
        )
        session = gw.router.sessions.get(f"{tag}-child")
        assert session is not None and session.parent_id == f"{tag}-parent"  # named or inferred alike
        return a, response.headers[SERVED_BY]
    finally:
        await held.close()  # the gateway cancels the worker's sequence
        await client.close()


@pytest.fixture
async def caches(cluster: Cluster, nats_url: str, namespace: str) -> Any:
    for w in WORKERS:
        cluster.worker(w, "mock", "--num-blocks", str(NUM_BLOCKS), "--speedup", "0.1")
    for proc in cluster.workers.values():
        await asyncio.to_thread(proc.wait_http, "/health", 90.0)
    nc = await nats.connect(nats_url)
    try:
        yield WorkerCaches(nc, Subjects(namespace), WORKERS)
    finally:
        await nc.close()


@pytest.mark.parametrize("named", [True, False], ids=["parent-header", "inferred-parent"])
async def test_a_sub_agent_goes_with_its_parent_when_its_new_blocks_fit(
    caches: WorkerCaches, nats_url: str, namespace: str, named: bool
) -> None:
    for rule in (False, True):
        config = RouterConfig(parent_prefix_in_use=rule)
        tag = f"{'n' if named else 'i'}{int(rule)}"
        async with running_gateway(nats_url, namespace, f"gw-{tag}", router_config=config) as gw:
            await gw.wait_ready(len(WORKERS), 90.0)
            await settle(gw, caches, {})
            parent, child = await fork(gw, caches, tag, named)
            assert (child == parent) == rule, (tag, parent, child)
            await settle(gw, caches, {})  # the held stream is over before the next run
