"""How session_kv reads the wait for device memory from the router's view (router/policies/device_waits.py):
the prompts in chunked prefill, the shortcut for a prompt that fits, a stale report."""

from __future__ import annotations

import random

import pytest

from router.policies.base import RouterView
from router.policies.session_kv import SessionKv
from router.protocol import LoadReport
from router.router import Router
from tests.router.memory_pools import BS, chain, decoding, in_prefill_report, make, prefilling, report
from tests.router.policy_cases import view_of


@pytest.mark.parametrize("waiting", [0, 1])
def test_a_prompt_in_chunked_prefill_counts_at_its_whole_size(waiting: int) -> None:
    # w0 runs a 700-block prompt whose first chunks took 200 blocks (its report's count); 500 blocks of
    # it are still to compute. A 400-block prompt looks as if it fits beside it (200 + 400 of 1,000) but
    # waits for that request's decode (700 + 400). With a prompt of 100 blocks waiting there too, its
    # tokens are in the report's prefill (not the one in progress's) and its blocks queued ahead.
    waits = []
    for rule in (False, True):
        router = make(count_prefill_in_progress=rule)
        prefilling(router, "w0", "long", 700, 50, 10_000)
        if waiting:
            prefilling(router, "w0", "queued", 100, 10, 20_000)
        in_prefill_report(router, "w0", 200, 500, 1.0, waiting)
        policy = router.policy
        assert isinstance(policy, SessionKv)
        view = view_of(router, 1.0)
        assert policy._waits.in_prefill_blocks(view, "w0") == (500 if rule else 0)
        waits.append(policy.memory_wait_ms(chain(400, 30_000), "w0", view))
        # a prompt that fits beside the whole of it waits for nothing either way
        assert policy.memory_wait_ms(chain(150, 30_000), "w0", view) == 0.0
    assert waits[0] == 0.0 and waits[1] > 0.0


def test_the_shortcut_for_a_prompt_that_fits_agrees_with_the_walk_over_the_flights() -> None:
    # memory_waits answers 0 without walking the flights where a prompt fits beside every request there
    # counted whole; on random pools (decodes, queued prompts, some routed after the report, shared
    # prefixes) it must give what the walk gives for every prompt
    rng = random.Random(7)
    waited = 0
    for case in range(300):
        router = make(1)
        n_decoding, n_queued = rng.randint(0, 6), rng.randint(0, 6)
        for k in range(n_decoding + n_queued):
            add = decoding if k < n_decoding else prefilling
            base = 10_000 * rng.randint(1, 3)  # three system prompts, shared
            add(router, "w0", f"r{k}", rng.randint(1, 200), rng.randint(1, 400), base)
        waiting = rng.randint(0, n_queued)
        prefill = 1000 * waiting
        load = LoadReport("w0", 1.0, n_decoding, waiting, prefill, rng.randint(0, 1000), 1000, 1e4, 10.0)
        router.apply_load(load, 1.0)
        for k in range(rng.randint(0, 3)):  # routed there after the report
            prefilling(router, "w0", f"late{k}", rng.randint(1, 200), 10, 40_000 + 1_000 * k)
        policy = router.policy
        assert isinstance(policy, SessionKv)
        view = view_of(router, 1.5)
        waits = policy.memory_waits("w0", view)
        walk = policy._waits.walk(view, "w0", load, policy._waits.in_prefill_blocks(view, "w0"))
        for _ in range(5):
            prompt = chain(rng.randint(0, 50), 10_000 * rng.randint(1, 3)) + chain(
                rng.randint(1, 600), 90_000
            )
            assert waits(prompt) == walk.ms(prompt), case
            waited += walk.ms(prompt) > 0
    assert 300 < waited < 1200  # both answers were exercised


def two_decodes_on_w0() -> tuple[Router, SessionKv]:
    """w0 runs two decodes of 400 prompt blocks (100 and 300 tokens to go, a token every 0.1 s), 820 of
    its 1,000 blocks in use 1 s in: a 300-block prompt waits 9 s there (test_memory_wait.py)."""
    router = make()
    decoding(router, "w0", "a", 400, 100, 10_000)
    decoding(router, "w0", "b", 400, 300, 20_000)
    report(router, "w0", 2, 820, 1.0)
    policy = router.policy
    assert isinstance(policy, SessionKv)
    return router, policy


def test_a_stale_report_or_decodes_that_yield_predict_no_wait() -> None:
    router, policy = two_decodes_on_w0()
    prompt = chain(300, 30_000)
    assert policy._waits.ms(view_of(router, 1.0), "w0", prompt) == pytest.approx(9_000.0)
    # past `report_stale_s` (2 s) the report says nothing of the blocks in use
    assert policy._waits.ms(view_of(router, 3.5), "w0", prompt) == 0.0
    # where the router sends decodes apart at a priority every prompt outranks, the prompt preempts them
    yielding = RouterView(
        router.workers(), router.index, router.approx, router.load, None, BS, 1.0, yielding=frozenset({"w0"})
    )
    assert policy._waits.ms(yielding, "w0", prompt) == 0.0


def test_a_pick_held_at_the_router_frees_nothing_on_its_worker() -> None:
    # held at the router, decode a is not on w0: the walk leaves it out, so only b's completion at 31 s
    # (300 tokens from 1 s) can free the blocks the prompt lacks
    router, policy = two_decodes_on_w0()
    prompt = chain(300, 30_000)
    held = RouterView(
        router.workers(), router.index, router.approx, router.load, None, BS, 1.0, held=frozenset({"a"})
    )
    assert policy._waits.ms(held, "w0", prompt) == pytest.approx(29_000.0)


def test_a_prompt_needs_one_block_beyond_its_full_ones() -> None:
    # w0 runs a 600-block request decoding 50 tokens (5 s), 600 of its 1,000 blocks in use. A prompt of
    # 399 full blocks fits; one of 400 does not: the engine takes a block for its partial last block (or
    # its first output token) beside them, as vLLM's and the mock's admission count ceil(tokens / 16),
    # and it waits for that decode. Counted at its full blocks, a prompt short of one block was sent
    # as fitting and waited a whole decode in the engine's queue.
    router = make(1)
    decoding(router, "w0", "a", 600, 50, 10_000)
    report(router, "w0", 1, 600, 0.0)
    policy = router.policy
    assert isinstance(policy, SessionKv)
    view = view_of(router, 0.0)
    assert policy.memory_wait_ms(chain(399, 30_000), "w0", view) == 0.0
    assert policy.memory_wait_ms(chain(400, 30_000), "w0", view) == pytest.approx(5_000.0)
    # the walk agrees with the shortcut at the edge
    load = view.load.workers["w0"].report
    assert load is not None
    walked = policy._waits.walk(view, "w0", load, 0)
    assert walked.ms(chain(399, 30_000)) == 0.0 and walked.ms(chain(400, 30_000)) == pytest.approx(5_000.0)
