"""Replicas share picks, first tokens and completions over a real nats-server; each records the others'
into its own router."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import openai
import pytest

from gateway.replicas import ReplicaSync
from router.protocol import RouteDone, RoutePicked, Subjects, WorkerRegistration
from router.request import RouteRequest
from router.router import Router
from tests.gateway.conftest import Cluster
from tests.gateway.gateways import running_gateway
from tests.polling import until

WORKERS = ("w0", "w1", "w2")


def router() -> Router:
    r = Router()
    for wid in WORKERS:
        r.add_worker(WorkerRegistration(wid, "http://w", "m", 16, 4096, "mock", 1, 0.0), 0.0)
    return r


class Replica:
    def __init__(self, name: str, subjects: Subjects, **kwargs: float) -> None:
        self.router = router()
        self.sync = ReplicaSync(subjects, self.router, name, **kwargs)
        self.n = 0
        self.hash_base = int.from_bytes(name.encode()) << 32  # two replicas never make the same chain

    def request(
        self, tokens: int, session: str | None = None, chain: list[int] | None = None
    ) -> RouteRequest:
        self.n += 1
        own = [self.hash_base + self.n * 1000 + i for i in range(tokens // 16)]
        hashes = chain if chain is not None else own
        return RouteRequest(f"{self.sync.replica_id}-r{self.n}", "m", hashes, tokens, session, 16)

    def pick(self, request: RouteRequest) -> str:
        decision = self.router.pick(request, 0.0)
        self.sync.picked(request, decision)
        return decision.worker_id


@pytest.fixture
async def pair(nats_url: str, namespace: str) -> AsyncIterator[tuple[Replica, Replica]]:
    subjects = Subjects(namespace)
    a, b = Replica("a", subjects), Replica("b", subjects)
    conns = [await nats.connect(nats_url), await nats.connect(nats_url)]
    await a.sync.start(conns[0])
    await b.sync.start(conns[1])
    # each has heard the other's heartbeat: both subscriptions are live at the server (a note published
    # on one connection may otherwise overtake the other connection's fresh subscription)
    await until(lambda: "a" in b.sync.peers and "b" in a.sync.peers, 30.0, "the replicas' heartbeats")
    try:
        yield a, b
    finally:
        for replica in (a, b):
            await replica.sync.stop()
        for nc in conns:
            await nc.close()


async def test_replicas_do_not_pile_onto_one_idle_worker(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    picks = []
    for i in range(6):  # alternate replicas, no load report in between: predictions alone spread them
        replica = (a, b)[i % 2]
        picks.append(replica.pick(replica.request(4096)))
        other = (b, a)[i % 2]
        await until(lambda other=other, i=i: other.sync.applied >= i // 2 + 1)
    assert sorted(picks) == sorted(WORKERS * 2)
    for wid in WORKERS:  # both routers count the same in-flight prefill on every worker
        assert a.router.load.queued_prefill(wid, 0.0) == b.router.load.queued_prefill(wid, 0.0) == 2 * 4096


async def test_alone_a_router_would_pile_up(pair: tuple[Replica, Replica]) -> None:
    """The control: without the other's notes, each replica sends its first request to the same worker."""
    a, b = pair
    await a.sync.stop()
    await b.sync.stop()
    assert a.pick(a.request(4096)) == b.pick(b.request(4096))


async def test_first_token_and_completion_release_the_load(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    request = a.request(4096, session="s1")
    worker = a.pick(request)
    await until(lambda: b.router.load.requests(worker) == 1)
    assert b.router.load.queued_prefill(worker, 0.0) == 4096
    a.sync.first_token(request.request_id)
    await until(lambda: b.router.load.queued_prefill(worker, 0.0) == 0)
    assert b.router.load.requests(worker) == 1  # decoding: its blocks still count
    a.sync.done(request.request_id, "tool_calls", 20, True)
    await until(lambda: b.router.load.requests(worker) == 0)
    session = b.router.sessions.get("s1")
    assert session is not None and session.tool_pending  # the tool loop state travels too


async def test_a_session_stays_on_one_worker_across_replicas(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    chain = list(range(1, 65))
    workers = set()
    for turn in range(6):
        replica = (a, b)[turn % 2]
        other = (b, a)[turn % 2]
        before = other.sync.applied
        chain = chain + [10_000 * (turn + 1) + i for i in range(32)]
        request = replica.request(len(chain) * 16, session="agent-1", chain=chain)
        workers.add(replica.pick(request))
        await until(lambda other=other, before=before: other.sync.applied > before)
        replica.sync.done(request.request_id, "stop", 10, True)
        # load elsewhere: the session's worker is the busiest, yet the session stays
        busy = other.request(2048)
        other.pick(busy)
    assert len(workers) == 1


async def test_an_inferred_session_is_recognised_by_the_other_replica(pair: tuple[Replica, Replica]) -> None:
    a, b = pair
    chain = list(range(100, 200))
    sid = a.router.resolve_session(None, chain)
    a.pick(a.request(len(chain) * 16, session=sid, chain=chain))
    await until(lambda: b.sync.applied == 1)
    assert b.router.resolve_session(None, [*chain, 7, 8, 9]) == sid


async def test_own_notes_unknown_workers_and_garbage_are_ignored(
    pair: tuple[Replica, Replica], nats_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = pair
    own = RoutePicked("a", "x", "w0", "m", 64, 1, 0)
    assert not a.sync.apply(own)
    assert not b.sync.apply(RoutePicked("c", "y", "no-such-worker", "m", 64, 1, 0))
    assert not b.sync.apply(RoutePicked("c", "z", "w0", "m", 64, 1, 0, chain=b"123"))
    assert not b.sync.apply(RouteDone("c", "never-picked"))
    nc = await nats.connect(nats_url)
    await nc.publish(Subjects(namespace).replica_route, b"\x01garbage")
    await nc.flush()
    await nc.close()
    # dropped as malformed (once an AttributeError, a union having no __name__, escaped the handler instead)
    await until(lambda: "dropping a malformed replica note" in caplog.text, 30.0, "the garbage's warning")
    worker = a.pick(a.request(256))
    await until(lambda: b.sync.applied == 1)  # still listening after the garbage
    assert b.router.load.requests(worker) == 1


async def test_a_silent_replica_loses_its_predictions(namespace: str) -> None:
    b = Replica("b", Subjects(namespace), replica_timeout_s=5.0)
    clock = [100.0]
    b.sync.clock = lambda: clock[0]
    assert b.sync.apply(RoutePicked("a", "r1", "w1", "m", 4096, 16, 0))
    assert b.router.load.requests("w1") == 1
    clock[0] += 4.0
    assert b.sync.expire(clock[0]) == []
    clock[0] += 2.0
    assert b.sync.expire(clock[0]) == ["a"]
    assert b.router.load.requests("w1") == 0


async def test_predictions_per_replica_are_bounded(namespace: str) -> None:
    b = Replica("b", Subjects(namespace), max_inflight=3)
    for i in range(10):
        assert b.sync.apply(RoutePicked("a", f"r{i}", "w0", "m", 64, 1, 0))
    assert b.router.load.requests("w0") == 3
    assert list(b.sync.peers["a"].inflight) == ["r7", "r8", "r9"]


@pytest.mark.slow
async def test_a_session_alternating_between_two_gateways_stays_on_one_worker(
    cluster: Cluster, nats_url: str, namespace: str
) -> None:
    """Two real gateways on one NATS, three real workers: the turns of one agent session alternate
    between the gateways and still land on one worker, each hitting the cache of the turn before."""
    for i in range(3):
        cluster.worker(f"r{i}", "mock", "--speedup", "1000")
    for proc in cluster.workers.values():
        await asyncio.to_thread(proc.wait_http, "/health", 60.0)
    async with (
        running_gateway(nats_url, namespace, "gw-a") as a,
        running_gateway(nats_url, namespace, "gw-b") as b,
    ):
        await a.wait_ready(workers=3)
        await b.wait_ready(workers=3)
        clients = [
            openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0) for gw in (a, b)
        ]
        messages = [{"role": "system", "content": "You are a coding agent with tools. " * 20}]
        workers, cached, prompts = [], [], []
        try:
            for turn in range(10):
                messages.append({"role": "user", "content": f"tool result {turn}: " + "y" * 150})
                raw = await clients[turn % 2].chat.completions.with_raw_response.create(
                    model="mock", messages=messages, max_tokens=4, extra_headers={"x-session-id": "agent-7"}
                )
                reply = raw.parse()
                workers.append(raw.headers["x-kvgate-worker"])
                cached.append(reply.usage.prompt_tokens_details.cached_tokens)
                prompts.append(reply.usage.prompt_tokens)
                messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
                # the other gateway learnt the session's worker from this one, not from a guess
                other = (b, a)[turn % 2].router.sessions
                await until(
                    lambda other=other, w=workers[-1]: (
                        (s := other.get("agent-7")) is not None and s.worker_id == w
                    ),
                    5.0,
                    "the other gateway's session binding",
                )
        finally:
            for sdk in clients:
                await sdk.close()
    assert len(set(workers)) == 1, workers
    for turn in range(1, 10):  # growing, and nearly all of the previous prompt each time
        assert cached[turn] > cached[turn - 1], cached
        assert cached[turn] >= 0.9 * prompts[turn - 1], (cached, prompts)
