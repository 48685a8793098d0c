"""Live: two agent sessions that share a system prompt and one request without a session, through the
real gateway (its aiohttp app on a loopback port) to three real `kvgate worker --engine mock` processes
over a real nats-server, land where each policy's published rule says.

The turns, in order, one at a time (each answered, its KV events heard by the gateway, before the next):
X1 and Y1 (sessions x and y: the system prompt S and a user message), X2 (x's next turn, carrying a long
assistant answer; streamed and held open, so it is in flight for what follows), Y2 (y's next turn), Z
(no session, unrelated text). The expected worker of each is derived below from the policy's own
formula, written out here (not by calling kvgate's implementation), over what each worker then holds
and what is in flight; where the policy itself breaks ties at random the test asserts the set of
workers it may choose. Which worker served a turn is the worker's own word (`x-kvgate-served-by`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import nats
import openai
import pytest

from router.protocol import Subjects
from tests.gateway.conftest import Cluster
from tests.gateway.gateways import RunningGateway, running_gateway
from tests.gateway.live_routes import WorkerCaches, chat, text
from tests.polling import until

pytestmark = pytest.mark.slow

WORKERS = ("wa", "wb", "wc")
BS = 16  # the mock worker's block size; its tokenizer is one token per byte
SYSTEM, USER, LONG_ANSWER = 320, 160, 2400  # characters
SERVED_BY = "x-kvgate-served-by"


def blocks(chars: int) -> int:
    return chars // BS


class Turns:
    """The scenario's requests. Every text starts with the run's tag, so that the first block of every
    prompt (chat markup plus the first characters) differs from run to run on the same workers."""

    def __init__(self, tag: str) -> None:
        system = text(f"{tag}S", SYSTEM)
        x1, y1 = text("Xa", USER), text("Ya", USER)
        self.x1 = chat(("system", system), ("user", x1))
        self.y1 = chat(("system", system), ("user", y1))
        self.x2 = [*self.x1, *chat(("assistant", text("Ar", LONG_ANSWER)), ("user", text("Xb", USER)))]
        self.y2 = [*self.y1, *chat(("assistant", text("Br", USER)), ("user", text("Yb", USER)))]
        self.z = chat(("user", text(f"{tag}Z", 1200)))


class Run:
    """One policy's gateway over the shared workers, and the turns sent through it."""

    def __init__(self, gw: RunningGateway, caches: WorkerCaches, tag: str) -> None:
        self.gw = gw
        self.caches = caches
        self.turns = Turns(tag)
        self.tag = tag
        self.client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="k", max_retries=0, timeout=120)
        self.served: dict[str, str] = {}
        self.cached: dict[str, int] = {}
        self.held: Any = None

    async def settle(self, inflight: dict[str, int]) -> None:
        """Before a turn: the gateway's in-flight counts are `inflight`, it has heard every block the
        workers hold, and the workers' latest load reports agree (session_kv reads them)."""
        router = self.gw.router

        async def quiet() -> bool:
            for w in WORKERS:
                report = router.load.workers[w].report
                running = report.running + report.waiting if report is not None else -1
                if router.load.requests(w) != inflight.get(w, 0) or running != inflight.get(w, 0):
                    return False
            return True

        await until(quiet, 60.0, "in-flight counts and load reports")
        held = await self.caches.holdings()

        async def heard() -> bool:
            return all(held[w] <= self.gw.blocks(w) for w in WORKERS)

        await until(heard, 60.0, "the workers' KV events at the gateway")

    async def send(self, name: str, messages: list[dict[str, Any]], session: str | None) -> str:
        headers = {"x-session-id": f"{self.tag}-{session}"} if session else {}
        response = await self.client.chat.completions.with_raw_response.create(
            model="mock", messages=messages, max_tokens=2, extra_headers=headers
        )
        answer = response.parse()
        self.served[name] = response.headers[SERVED_BY]
        self.cached[name] = answer.usage.prompt_tokens_details.cached_tokens
        return self.served[name]

    async def hold(self, name: str, messages: list[dict[str, Any]], session: str) -> str:
        """Stream a long answer and leave it running once its first token arrived."""
        self.held = await self.client.chat.completions.create(
            model="mock",
            messages=messages,
            max_tokens=4000,  # at the mock's 6+ ms a step, it runs far longer than this test
            stream=True,
            extra_headers={"x-session-id": f"{self.tag}-{session}"},
        )
        self.served[name] = self.held.response.headers[SERVED_BY]
        async for chunk in self.held:
            if chunk.choices and chunk.choices[0].delta.content:
                break
        return self.served[name]

    async def play(self) -> None:
        t = self.turns
        await self.settle({})
        a = await self.send("X1", t.x1, "x")
        await self.settle({})
        await self.send("Y1", t.y1, "y")
        await self.settle({})
        await self.hold("X2", t.x2, "x")
        await self.settle({self.served["X2"]: 1})
        await self.send("Y2", t.y2, "y")
        await self.settle({self.served["X2"]: 1})
        await self.send("Z", t.z, None)
        assert a in WORKERS

    async def close(self) -> None:
        if self.held is not None:
            await self.held.close()  # the gateway cancels the worker's sequence
        await self.client.close()


@pytest.fixture
async def shared(cluster: Cluster, nats_url: str, namespace: str) -> Any:
    for w in WORKERS:
        cluster.worker(w)
    for proc in cluster.workers.values():
        await asyncio.to_thread(proc.wait_http, "/health", 90.0)
    nc = await nats.connect(nats_url)
    try:
        yield WorkerCaches(nc, Subjects(namespace), WORKERS)
    finally:
        await nc.close()


async def play(
    policy: str, nats_url: str, namespace: str, caches: WorkerCaches, check: Callable[[Run, list[str]], None]
) -> None:
    async with running_gateway(nats_url, namespace, f"gw-{policy}", policy=policy) as gw:
        await gw.wait_ready(len(WORKERS), 90.0)
        run = Run(gw, caches, policy[:2])
        try:
            await run.play()
            check(run, gw.router.workers())  # the gateway's worker list, in its order
        finally:
            await run.close()
        await until(_idle(gw), 60.0, "the held stream's end")  # before the next policy's run


def _idle(gw: RunningGateway) -> Callable[[], Any]:
    async def idle() -> bool:
        return all(
            gw.router.load.requests(w) == 0
            and (r := gw.router.load.workers[w].report) is not None
            and r.running + r.waiting == 0
            for w in WORKERS
        )

    return idle


def check_round_robin(run: Run, order: list[str]) -> None:
    """vLLM production-stack's round robin: the next worker of the list in turn."""
    assert [run.served[n] for n in ("X1", "Y1", "X2", "Y2", "Z")] == [order[i % 3] for i in range(5)]


def dynamo_cost(isl: int, overlap: int, prefill_in_flight: int, active: set[Any], prompt: set[Any]) -> float:
    """Dynamo 1.6.1's KV router (`lib/kv-router` scheduling/selector, sequences), its defaults: overlap
    score weight 1 x prefill blocks + potential decode blocks, in blocks. `active`: the prompt blocks of
    the requests this router sent to the worker that have not completed (a block shared by two counted
    once); `prefill_in_flight`: their tokens still to prefill (until their first token)."""
    prefill_blocks = max(0.0, (prefill_in_flight + isl) / BS - overlap)
    return 1.0 * prefill_blocks + len(active | prompt)


def check_kv_overlap(run: Run, order: list[str]) -> None:
    """Temperature 0: the lowest cost wins, ties at random. Blocks are named by what they hold."""
    a = run.served["X1"]  # nothing cached anywhere, nothing in flight: every cost equal, any worker
    others = set(WORKERS) - {a}
    # Y1: only `a` holds the system prompt's blocks; nothing in flight: the overlap decides
    assert run.served["Y1"] == a and run.cached["Y1"] >= blocks(SYSTEM) * BS
    assert run.served["X2"] == a  # `a` holds X1's blocks, the longest overlap; nothing in flight
    # Y2 while X2 runs on `a`: `a` holds Y1 (the system prompt and y1), but X2's prompt blocks are active
    # there; its prefill may or may not still count (first token seen), which only adds to a's cost
    system = {f"S{i}" for i in range(blocks(SYSTEM))}
    x2 = system | {f"x2-{i}" for i in range(blocks(2 * USER + LONG_ANSWER))}
    y2 = system | {f"y2-{i}" for i in range(blocks(3 * USER))}
    isl = (SYSTEM + 3 * USER) + 4  # characters plus a few tokens of chat markup
    at_a = dynamo_cost(isl, blocks(SYSTEM + USER), 0, x2, y2)
    elsewhere = dynamo_cost(isl, 0, 0, set(), y2)
    assert at_a - elsewhere > 100  # ~145 blocks: no rounding of the estimate above changes the winner
    assert run.served["Y2"] in others  # the other two cost the same: either
    assert run.served["Z"] in others  # no overlap anywhere; `a` still carries X2's active blocks


def check_cache_aware(run: Run, order: list[str]) -> None:
    """SGLang router 0.3.2: balanced (max - min load <= 64), so the longest match over the requests routed
    to each worker wins above 0.3 of the prompt (the first worker to take that text among equals), and
    below it the least loaded, the first listed among equals."""
    first = order[0]
    assert run.served["X1"] == first  # no match; all idle
    assert run.served["Y1"] == first  # the system prompt: 320 of ~480 characters matched
    assert run.served["X2"] == first  # X1 all matched
    assert run.served["Y2"] == first  # Y1 matched, ~480 of ~800 characters; loads 1, 0, 0: balanced
    assert run.served["Z"] == order[1]  # no match; `first` runs X2: the first idle one


def check_session_kv(run: Run, order: list[str]) -> None:
    """docs/SESSION_KV.md: a worker holding at least half of a new session's prompt is its home; a
    session stays on its worker while that is within the affinity tolerance of the best; a request that
    shares nothing pays a full prefill everywhere and more where a running request stalls it."""
    a = run.served["X1"]
    assert run.served["Y1"] == a  # the system prompt is 2/3 of y's first prompt: a's is the home
    assert run.served["X2"] == a and run.served["Y2"] == a  # sessions stay together
    assert run.served["Z"] in set(WORKERS) - {a}


CHECKS = {
    "round_robin": check_round_robin,
    "kv_overlap": check_kv_overlap,
    "cache_aware": check_cache_aware,
    "session_kv": check_session_kv,
}


async def test_sessions_sharing_a_system_prompt_land_as_each_policy_predicts(
    shared: WorkerCaches, nats_url: str, namespace: str
) -> None:
    for policy, check in CHECKS.items():
        await play(policy, nats_url, namespace, shared, check)
