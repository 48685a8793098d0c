"""Routers of a few workers, and the KV events, load reports and requests the policy tests send them
(test_policies.py, test_session_kv.py)."""

from __future__ import annotations

from router.config import RouterConfig
from router.policies.base import RouterView
from router.protocol import BlockStored, KvEventBatch, LoadReport, WorkerRegistration
from router.request import RouteRequest
from router.router import Router

BS = 16


def make(policy: str, n: int = 3, **config) -> Router:
    router = Router(policy=policy, config=RouterConfig(**config), seed=1)
    for i in range(n):
        router.add_worker(WorkerRegistration(f"w{i}", f"http://w{i}", "m", BS, 1000, "mock", 1, 0.0), 0.0)
    return router


def hold(router: Router, worker: str, chain: list[int], seq: int = 0) -> None:
    assert router.apply_kv_batch(KvEventBatch(worker, 1, seq, 0.0, [BlockStored(chain)]), 0.0)


def load(router: Router, worker: str, prefill: int, speed: float = 10_000.0, now: float = 0.0) -> None:
    router.apply_load(LoadReport(worker, now, 1, 0, prefill, 0, 1000, speed, 100.0), now)


def chain(n: int, base: int = 1000) -> list[int]:
    return list(range(base, base + n))


def req(rid: str, blocks: list[int], session: str | None = None, tokens: int | None = None) -> RouteRequest:
    return RouteRequest(rid, "m", blocks, tokens if tokens is not None else len(blocks) * BS, session)


def view_of(router: Router, now: float = 0.0) -> RouterView:
    """The view a policy reads, over every worker of `router`, no session, at `now`."""
    return RouterView(router.workers(), router.index, router.approx, router.load, None, BS, now)
