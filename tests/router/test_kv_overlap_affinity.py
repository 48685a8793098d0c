"""`kv_overlap` with Dynamo 1.6.1's session affinity (`kv_affinity_ttl_s`, Dynamo's
`--router-session-affinity-ttl-secs`; router/session_affinity.py), driven through the real Router.

Each rule as Dynamo's `SessionAffinity` (lib/kv-router/src/services/selection/affinity.rs) has it: hard
binding to the worker a named session was first dispatched to, a lease per request until its stream
ends, an idle TTL counted from the last lease's end, re-selection when the bound worker is gone."""

from __future__ import annotations

import pytest

from router.config import RouterConfig
from router.protocol import BlockStored, KvEventBatch, WorkerRegistration
from router.request import RouteRequest
from router.router import Router
from router.session_affinity import SessionAffinity

BS = 16
PREFIX = list(range(200))  # blocks w1 holds: a prompt on them is cheapest there by far


def make(ttl_s: float = 60.0, workers: int = 2) -> Router:
    router = Router(policy="kv_overlap", config=RouterConfig(kv_affinity_ttl_s=ttl_s), seed=1)
    for i in range(workers):
        router.add_worker(WorkerRegistration(f"w{i}", f"http://w{i}", "m", BS, 1000, "mock", 1, 0.0), 0.0)
    return router


LOAD = list(range(5_000, 5_040))  # blocks w1 holds from the start: the load request goes there


def store(router: Router, worker: str, blocks: list[int], seq: int) -> None:
    assert router.apply_kv_batch(KvEventBatch(worker, 1, seq, 0.0, [BlockStored(blocks)]), 0.0)


def cache_prefix_on_w1(router: Router) -> None:
    store(router, "w1", PREFIX, 1)


def turn(rid: str, blocks: list[int], session: str | None = "s") -> RouteRequest:
    return RouteRequest(rid, "m", blocks, len(blocks) * BS, session, expected_output_tokens=10)


def run(router: Router, request: RouteRequest, start: float, end: float) -> str:
    """Pick the request at `start`, complete it at `end`: its worker."""
    worker = router.pick(request, start).worker_id
    router.on_first_token(request.request_id, start)
    router.on_complete(request.request_id, end, "stop", 10)
    return worker


def bind_to_w0(router: Router, session: str = "s") -> None:
    """Session `session` starts on w0 (its first prompt cached nowhere, w1 busy), ending at 1.0."""
    store(router, "w1", LOAD, 0)
    assert router.pick(turn("load", LOAD, None), 0.0).worker_id == "w1"  # in flight all along
    assert run(router, turn("t1", list(range(9_000, 9_010)), session), 0.0, 1.0) == "w0"


def test_a_bound_session_stays_on_its_worker_whatever_the_kv_cost_says() -> None:
    # without affinity the turn goes where its prefix is cached (w1); with it, to its session's worker
    for ttl, expected in ((0.0, "w1"), (60.0, "w0")):
        router = make(ttl)
        bind_to_w0(router)
        cache_prefix_on_w1(router)
        decision = router.pick(turn("t2", [*PREFIX, 7]), 2.0)
        assert decision.worker_id == expected
        if ttl:
            assert decision.reason == "session" and decision.overlap_blocks == 0


def test_only_a_session_the_client_named_is_bound() -> None:
    router = make()
    # an id the router inferred (no header): Dynamo sees no session, so nothing binds it
    bind_to_w0(router, "inferred-abc")
    cache_prefix_on_w1(router)
    assert router.pick(turn("t2", [*PREFIX, 7], "inferred-abc"), 2.0).worker_id == "w1"


def test_the_ttl_counts_from_the_end_of_the_last_request() -> None:
    router = make(ttl_s=60.0)
    bind_to_w0(router)  # t1 ended at 1.0: bound until 61.0
    cache_prefix_on_w1(router)
    long_turn = turn("t2", list(range(9_000, 9_020)))
    assert router.pick(long_turn, 2.0).worker_id == "w0"
    # a request in flight holds a lease: the binding does not idle however long it runs (past 61.0)
    router.on_first_token("t2", 3.0)
    assert run(router, turn("side", [*PREFIX, 9]), 70.0, 71.0) == "w0"
    router.on_complete("t2", 100.0, "stop", 10)  # its end refreshes the deadline: 160.0
    assert run(router, turn("t3", [*PREFIX, 7]), 159.0, 159.5) == "w0"  # deadline now 219.5
    assert router.pick(turn("t4", [*PREFIX, 8]), 219.5).worker_id == "w1"  # idle past it: KV routing
    # re-selected, the session is bound again, to where that turn went
    router.on_first_token("t4", 219.6)
    router.on_complete("t4", 220.0, "stop", 10)
    assert router.pick(turn("t5", list(range(9_000, 9_011))), 221.0).worker_id == "w1"


def test_a_bound_worker_that_left_is_replaced() -> None:
    router = make(workers=3)
    bind_to_w0(router)
    router.remove_worker("w0")
    cache_prefix_on_w1(router)
    assert run(router, turn("t2", [*PREFIX, 7]), 2.0, 3.0) == "w1"
    router.add_worker(WorkerRegistration("w0", "http://w0", "m", BS, 1000, "mock", 2, 4.0), 4.0)
    # bound to w1 now: a prompt cached nowhere, w2 idle, still goes there
    assert router.pick(turn("t3", list(range(7_000, 7_050))), 5.0).worker_id == "w1"


def test_a_full_table_routes_new_sessions_without_affinity() -> None:
    table = SessionAffinity(60.0, max_entries=1)
    table.bind("r1", "a", "w0", 0.0)
    table.bind("r2", "b", "w1", 0.0)  # full: not bound
    assert table.target("r3", "a", 1.0, lambda w: True) == "w0"
    assert table.target("r4", "b", 1.0, lambda w: True) is None
    # an idle binding past its TTL makes room
    table.release("r1", 1.0)
    table.release("r3", 1.0)
    table.bind("r5", "b", "w1", 61.0)
    assert table.bound_worker("b", 62.0) == "w1" and table.bound_worker("a", 62.0) is None


def test_ttl_bounds_are_dynamos() -> None:
    assert RouterConfig().kv_affinity_ttl_s == 0  # off by default, as in Dynamo
    for bad in (0.5, -1.0, 31_536_001.0):
        with pytest.raises(ValueError, match="kv_affinity_ttl_s"):
            RouterConfig(kv_affinity_ttl_s=bad)
