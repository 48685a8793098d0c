"""`kv_overlap` with Dynamo's session affinity and router queue against the real NVIDIA Dynamo 1.6.1
(PyPI `ai-dynamo-runtime`, the `peers` extra; skipped without it): the same requests, first tokens and
completions go to Dynamo's runtime-free `SelectionService` and to kvgate's router, which must place
and release them alike.

Dynamo's queue is on through its environment (`DYN_ROUTER_QUEUE_THRESHOLD`, `DYN_ROUTER_QUEUE_POLICY`,
read when the service starts). The frontend turns a hard session binding into a pinned worker
(lib/llm/src/kv_router/routing_host/kv_selection.rs), so the queue test pins the session's turn as the
frontend does; the affinity test uses the service's own session table (the same `SessionAffinity`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from router.config import RouterConfig
from router.hashing import block_hashes
from router.protocol import WorkerRegistration
from router.request import Decision, RouteRequest
from router.router import Router
from tests.router.test_kv_overlap_dynamo import BS, WORKERS, DynamoPool, until

dynamo = pytest.importorskip("dynamo._core", reason="the peers extra (ai-dynamo-runtime) is not installed")
zmq = pytest.importorskip("zmq")

BATCHED = 8192


class Pool(DynamoPool):
    """Dynamo's selection service; its workers announce max_num_batched_tokens (its queue needs it)."""

    worker_fields = {"max_num_batched_tokens": BATCHED}

    async def ready(self) -> None:
        async def schedulable() -> bool:
            return bool(self.service.ready()["ready"])

        await until(schedulable, "Dynamo's workers schedulable", 60.0)


def ours(config: RouterConfig) -> Router:
    router = Router("kv_overlap", config=config)
    for w in range(WORKERS):
        reg = WorkerRegistration(
            f"w{w}", f"http://w{w}", "m", BS, 100_000, "mock", 1, 0.0, max_num_batched_tokens=BATCHED
        )
        router.add_worker(reg, 0.0)
    return router


def prompt(base: int, blocks: int) -> list[int]:
    return list(range(base, base + blocks * BS))


def request(rid: str, tokens: list[int], session: str | None = None) -> RouteRequest:
    return RouteRequest(rid, "m", block_hashes(tokens, BS), len(tokens), session)


class Both:
    """One scenario on both routers: Dynamo's picks recorded in ours where ours does not pick."""

    def __init__(self, pool: Pool, router: Router) -> None:
        self.pool = pool
        self.router = router
        self.now = 0.0
        self.picked: dict[str, int] = {}  # Dynamo's worker per request, as it answered

    async def select(
        self, rid: str, tokens: list[int], session: str | None = None, pin: int | None = None
    ) -> int:
        payload: dict[str, Any] = {"token_ids": tokens, "selection_id": rid}
        if session is not None and pin is None:
            payload["session_context"] = {"session_id": session}
        if pin is not None:  # the frontend's hard binding: a pinned worker and rank
            payload["pinned_worker"] = {"worker_id": pin, "dp_rank": 0}
        answer = await self.pool.service.select_and_reserve(payload)
        self.picked[rid] = answer["worker_id"]
        return int(answer["worker_id"])

    def record(self, rid: str, tokens: list[int], session: str | None = None) -> None:
        worker = f"w{self.picked[rid]}"
        assert self.router.record(request(rid, tokens, session), Decision(worker, 0, 0.0, "dynamo"), self.now)

    async def first_token(self, rid: str) -> None:
        await self.pool.service.prefill_complete(rid)
        self.router.on_first_token(rid, self.now)

    async def done(self, rid: str) -> None:
        await self.pool.service.free_reservation(rid)
        self.router.on_complete(rid, self.now, "stop", 1)


async def queue_scenario(pool: Pool) -> None:
    both = Both(pool, ours(RouterConfig(kv_affinity_ttl_s=60, kv_queue=True, kv_queue_wspt=True)))
    router = both.router
    session = prompt(90_000, 10)
    a = await both.select("s1", session)
    both.record("s1", session, "s")  # ours binds session "s" to A, as the frontend's table does
    await both.first_token("s1")
    await both.done("s1")
    fillers: dict[int, str] = {}
    for i in range(WORKERS):  # one prefill in flight on every worker: all busy at threshold 0
        tokens = prompt(10_000 * (i + 1), 10)
        fillers[await both.select(f"f{i}", tokens)] = f"f{i}"
        both.record(f"f{i}", tokens)
    assert sorted(fillers) == list(range(WORKERS))
    tokens = {"long": prompt(50_000, 80), "s2": prompt(90_000, 12), "short": prompt(60_000, 20)}
    waiting = {rid: request(rid, t, "s" if rid == "s2" else None) for rid, t in tokens.items()}
    tasks = {}
    for rid, req in waiting.items():
        assert not router.admit(req, both.now), rid
        tasks[rid] = asyncio.create_task(both.select(rid, tokens[rid], pin=a if rid == "s2" else None))
        await asyncio.sleep(0.1)
    released: list[str] = []

    async def release(expected: list[str]) -> None:
        """Ours releases `expected` now, picks each where Dynamo placed it, and Dynamo released
        exactly those too."""
        assert router.release_held(both.now) == expected
        released.extend(expected)
        for rid in expected:
            await asyncio.wait_for(tasks[rid], 10.0)
        await asyncio.sleep(0.2)
        assert sorted(rid for rid, t in tasks.items() if t.done()) == sorted(released)

    await asyncio.sleep(0.2)
    assert not any(t.done() for t in tasks.values())  # Dynamo queued all three as well
    b = next(w for w in fillers if w != a)
    await both.first_token(fillers[b])  # B frees: the shortest unpinned goes; s2's lane (A) is blocked
    await release(["short"])
    assert router.pick(waiting["short"], both.now).worker_id == f"w{both.picked['short']}" == f"w{b}"
    await both.first_token(fillers[a])  # A frees: s2 (shorter than long) goes to its bound worker
    await release(["s2"])
    assert router.pick(waiting["s2"], both.now).worker_id == f"w{both.picked['s2']}" == f"w{a}"
    for w, rid in fillers.items():
        if w not in (a, b):
            await both.first_token(rid)
    await release(["long"])
    # long's cost ties between the two workers left idle: each side picks one of them
    assert both.picked["long"] not in (a, b)
    assert router.pick(waiting["long"], both.now).worker_id not in (f"w{a}", f"w{b}")


def run_scenario(pool: Pool, scenario: Callable[[Pool], Awaitable[None]]) -> None:
    """`scenario` against Dynamo's service once its workers are schedulable and subscribed."""

    async def run() -> None:
        await pool.start()
        try:
            await pool.ready()
            await pool.wait_subscribed()
            await scenario(pool)
        finally:
            pool.close()

    asyncio.run(run())


def test_the_router_queue_holds_and_releases_as_dynamos(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DYN_ROUTER_QUEUE_THRESHOLD", "0.0")
    monkeypatch.setenv("DYN_ROUTER_QUEUE_POLICY", "wspt")

    run_scenario(Pool(), queue_scenario)


async def affinity_scenario(pool: Pool) -> None:
    both = Both(pool, ours(RouterConfig(kv_affinity_ttl_s=1)))  # Dynamo's shortest TTL: 1 s
    router = both.router
    start = time.monotonic()

    def clock() -> float:
        both.now = time.monotonic() - start
        return both.now

    first = prompt(90_000, 10)
    a = await both.select("s1", first, "s")
    both.record("s1", first, "s")
    clock()
    await both.first_token("s1")
    await both.done("s1")
    load = prompt(5_000, 30)  # A busy with a long prefill: the KV cost sends anything else elsewhere
    await both.select("x", load, pin=a)
    both.record("x", load)
    second = prompt(90_000, 11)
    assert await both.select("s2", second, "s") == a  # bound: Dynamo pins it to A
    assert router.pick(request("s2", second, "s"), clock()).worker_id == f"w{a}"
    # a request in flight holds its lease: past the TTL the session is still bound
    await asyncio.sleep(1.3)
    third = prompt(90_000, 12)
    assert await both.select("s3", third, "s") == a
    assert router.pick(request("s3", third, "s"), clock()).worker_id == f"w{a}"
    for rid in ("s2", "s3"):
        clock()
        await both.first_token(rid)
        await both.done(rid)
    # idle past the TTL from the last request's end: selected afresh, away from the loaded A
    await asyncio.sleep(1.3)
    fourth = prompt(90_000, 13)
    assert await both.select("s4", fourth, "s") != a
    assert router.pick(request("s4", fourth, "s"), clock()).worker_id != f"w{a}"


def test_session_affinity_binds_and_idles_as_dynamos() -> None:
    run_scenario(Pool(session_affinity_ttl_secs=1), affinity_scenario)
