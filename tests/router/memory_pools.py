"""Pools of workers with requests decoding and in chunked prefill, for the tests of the predicted wait
for device memory (test_memory_wait.py, test_device_waits.py)."""

from __future__ import annotations

from router.protocol import LoadReport
from router.request import Decision, RouteRequest
from router.router import Router
from tests.router import policy_cases
from tests.router.policy_cases import BS, chain


def make(n: int = 2, **config: object) -> Router:
    """`n` session_kv workers of 1,000 blocks each."""
    return policy_cases.make("session_kv", n, **config)


def decoding(router: Router, worker: str, rid: str, blocks: int, output: int, base: int) -> None:
    """A request of `blocks` prompt blocks picked on `worker` at 0 s, decoding `output` tokens from then."""
    request = RouteRequest(rid, "m", chain(blocks, base), blocks * BS, rid, expected_output_tokens=output)
    assert router.record(request, Decision(worker, 0, 0.0, "load"), 0.0)
    router.on_first_token(rid, 0.0)


def report(router: Router, worker: str, running: int, used: int, now: float, waiting: int = 0) -> None:
    # decode tokens/s = running x 10: one token every 0.1 s per request
    prefill = 1000 * waiting
    load = LoadReport(worker, now, running, waiting, prefill, used, 1000, 10_000.0, 10.0 * running)
    router.apply_load(load, now)


def prefilling(router: Router, worker: str, rid: str, blocks: int, output: int, base: int) -> None:
    """A request of `blocks` prompt blocks picked on `worker` at 0 s, admitted and still in prefill."""
    request = RouteRequest(rid, "m", chain(blocks, base), blocks * BS, rid, expected_output_tokens=output)
    assert router.record(request, Decision(worker, 0, 0.0, "load"), 0.0)


def in_prefill_report(
    router: Router, worker: str, taken: int, left: int, now: float, waiting: int = 0
) -> None:
    """`worker` runs one prompt in chunked prefill: `taken` blocks so far, `left` blocks of tokens to go,
    plus `waiting` prompts of 100 blocks queued (their tokens counted in the report's prefill too)."""
    prefill = (left + 100 * waiting) * BS
    router.apply_load(LoadReport(worker, now, 1, waiting, prefill, taken, 1000, 10_000.0, 10.0), now)
