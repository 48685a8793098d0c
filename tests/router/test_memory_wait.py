"""The predicted wait for device memory (router/policies/memory_wait.py) and what session_kv does with it."""

from __future__ import annotations

import random

import pytest

from router.config import RouterConfig
from router.policies.base import RouterView
from router.policies.session_kv import SessionKv
from router.protocol import BlockStored, KvEventBatch, LoadReport, WorkerRegistration
from router.request import Decision, RouteRequest
from router.router import Router

BS = 16


def make(n: int = 2, **config: object) -> Router:
    router = Router(policy="session_kv", config=RouterConfig(**config), seed=1)
    for i in range(n):
        router.add_worker(WorkerRegistration(f"w{i}", f"http://w{i}", "m", BS, 1000, "mock", 1, 0.0), 0.0)
    return router


def chain(n: int, base: int) -> list[int]:
    return list(range(base, base + n))


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


def test_the_wait_lasts_until_the_decodes_in_flight_free_enough_blocks() -> None:
    # w0 runs two decodes of 400 prompt blocks, 100 and 300 tokens to go at a token every 0.1 s, and has
    # 820 of its 1,000 blocks in use 1 s in. A 300-block prompt does not fit: it waits for the first
    # decode to end at 10 s, which frees more than the 120 blocks missing plus what the other decode
    # grew meanwhile: 9 s. One of 150 blocks fits now; on an idle worker nothing waits.
    router = make()
    decoding(router, "w0", "a", 400, 100, 10_000)
    decoding(router, "w0", "b", 400, 300, 20_000)
    report(router, "w0", 2, 820, 1.0)
    report(router, "w1", 0, 0, 1.0)
    policy = router.policy
    assert isinstance(policy, SessionKv)
    view = RouterView(router.workers(), router.index, router.approx, router.load, None, BS, 1.0)
    assert policy._memory_wait(view, "w0", chain(300, 30_000)) == pytest.approx(9_000.0)
    assert policy._memory_wait(view, "w0", chain(150, 30_000)) == 0.0
    assert policy._memory_wait(view, "w1", chain(300, 30_000)) == 0.0
    # a prompt that shares its first 200 blocks with decode a takes no new blocks for them: it fits
    assert policy._memory_wait(view, "w0", chain(200, 10_000) + chain(100, 30_000)) == 0.0


def pool_with_a_long_decode(w1_running: int, w1_waiting: int = 0, **config: object) -> Router:
    """Session s's first turn (280 blocks) ran on w0 and is cached there; w0 now runs a 500-block
    request with 300 tokens to decode (30 s), 820 of its 1,000 blocks in use; w1 holds nothing."""
    router = make(**config)
    first = RouteRequest("s1", "m", chain(280, 50_000), 280 * BS, "s", expected_output_tokens=10)
    assert router.record(first, Decision("w0", 0, 0.0, "load"), 0.0)
    router.on_first_token("s1", 0.0)
    router.on_complete("s1", 0.0, "stop", 10)
    assert router.apply_kv_batch(KvEventBatch("w0", 1, 0, 0.0, [BlockStored(chain(280, 50_000))]), 0.0)
    decoding(router, "w0", "a", 500, 300, 10_000)
    report(router, "w0", 1, 820, 1.0)
    report(router, "w1", w1_running, 0, 1.0, w1_waiting)
    return router


def test_a_turn_that_would_wait_for_memory_moves_to_an_idle_worker_with_room() -> None:
    # s's next turn (300 blocks, 280 of them cached on w0) does not fit beside w0's long decode: it would
    # wait ~29 s there. The estimate prices that wait as the prefill of the 120 blocks over capacity, so
    # without the rule (memory_wait_move 0) it stays; with it (the default) it goes to w1, idle, where
    # its prefill takes well under 29 s.
    turn = RouteRequest("s2", "m", chain(280, 50_000) + chain(20, 60_000), 300 * BS, "s")
    assert pool_with_a_long_decode(0, memory_wait_move=0.0).pick(turn, 1.0).worker_id == "w0"
    moved = pool_with_a_long_decode(0).pick(turn, 1.0)
    assert (moved.worker_id, moved.reason) == ("w1", "memory")
    # a worker running two requests is no way out (the wait would spread to the sessions living there),
    # nor one with a prompt queued (it is about to take blocks its report does not count yet)
    assert pool_with_a_long_decode(2).pick(turn, 1.0).worker_id == "w0"
    assert pool_with_a_long_decode(0, 1).pick(turn, 1.0).worker_id == "w0"


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
        view = RouterView(router.workers(), router.index, router.approx, router.load, None, BS, 1.0)
        assert policy._in_prefill_blocks(view, "w0") == (500 if rule else 0)
        waits.append(policy._memory_wait(view, "w0", chain(400, 30_000)))
        # a prompt that fits beside the whole of it waits for nothing either way
        assert policy._memory_wait(view, "w0", chain(200, 30_000)) == 0.0
    assert waits[0] == 0.0 and waits[1] > 0.0


def test_a_turn_beside_a_long_prompts_first_chunk_loses_its_session_hold() -> None:
    # session s's context (280 blocks) is cached on w0, where a 750-block prompt has taken 200 blocks so
    # far and has 550 to go; w1 is idle. s's next turn (300 blocks) fits beside the 200 the report counts,
    # so the session hold keeps it on w0; counted whole (750 + 300 > 1,000) it would wait there for that
    # prompt's decode, so the hold is dropped and the turn goes to w1, the cheaper.
    turn = RouteRequest("s2", "m", chain(280, 50_000) + chain(20, 60_000), 300 * BS, "s")
    picks = []
    for rule in (False, True):
        router = make(count_prefill_in_progress=rule)
        first = RouteRequest("s1", "m", chain(280, 50_000), 280 * BS, "s", expected_output_tokens=10)
        assert router.record(first, Decision("w0", 0, 0.0, "load"), 0.0)
        router.on_first_token("s1", 0.0)
        router.on_complete("s1", 0.0, "stop", 10)
        assert router.apply_kv_batch(KvEventBatch("w0", 1, 0, 0.0, [BlockStored(chain(280, 50_000))]), 0.0)
        prefilling(router, "w0", "long", 750, 300, 10_000)
        in_prefill_report(router, "w0", 200, 550, 1.0)
        report(router, "w1", 0, 0, 1.0)
        d = router.pick(turn, 1.0)
        picks.append((d.worker_id, d.reason))
    assert picks == [("w0", "session"), ("w1", "load")]


@pytest.mark.parametrize("rule", [False, True])
def test_a_decode_its_worker_preempted_waits_there_and_resumes_where_it_stopped(rule: bool) -> None:
    # w0 runs decode a (400 prompt blocks, 100 tokens to go from 0 s; 407 blocks with its output) and b
    # (300 blocks, 300 tokens from 0.5 s; 319 blocks), a token every 0.1 s each. From 1.0 s w0's reports
    # run one request and queue one: the worker preempted b, the last admitted, for memory. A report
    # may lead a completion by a step, so only once that has lasted 0.5 s does b count (with
    # `memory_wait_preempted`) as queued at the head of w0's queue: a 300-block prompt that fits beside
    # the 420 blocks in use then waits for a's end at 10 s behind b's 319. At 3.0 s w0 runs both again:
    # b's decode resumed from the 5 tokens it had, 2 s late, so it ends at 32.5 s, not 30.5 s.
    router = make(memory_wait_preempted=rule)
    decoding(router, "w0", "a", 400, 100, 10_000)
    b = RouteRequest("b", "m", chain(300, 20_000), 300 * BS, "b", expected_output_tokens=300)
    assert router.record(b, Decision("w0", 0, 0.0, "load"), 0.0)
    router.on_first_token("b", 0.5)
    policy = router.policy
    assert isinstance(policy, SessionKv)

    def wait(now: float, running: int, waiting: int, used: int, blocks: int) -> float:
        load = LoadReport("w0", now, running, waiting, 0, used, 1000, 10_000.0, 10.0 * running)
        router.apply_load(load, now)
        view = RouterView(router.workers(), router.index, router.approx, router.load, None, BS, now)
        return policy._memory_wait(view, "w0", chain(blocks, 30_000))

    assert wait(1.0, 1, 1, 420, 300) == 0.0
    assert wait(1.2, 1, 1, 420, 300) == 0.0  # not yet: a completion the router has not seen, maybe
    assert wait(1.6, 1, 1, 420, 300) == (pytest.approx(8_400.0) if rule else 0.0)
    assert wait(3.0, 2, 0, 900, 600) == pytest.approx(29_500.0 if rule else 27_500.0)


def pool_beside_one_shot(named: int = 0, used: int = 700, **config: object) -> Router:
    """Session s's first turn (280 blocks) is cached on w0, which now runs a 500-block request with 50
    tokens to decode (5 s), 820 of its 1,000 blocks in use. w1 runs 80 one-shot questions (10 blocks
    each, 30 tokens to decode; `named` of them named sessions' turns instead), `used` blocks in use.
    The pool's average prefill cost is 0.1 ms a token (the reports' speed), its marginal cost 0.01."""
    router = make(**config)
    first = RouteRequest("s1", "m", chain(280, 50_000), 280 * BS, "s", expected_output_tokens=10)
    assert router.record(first, Decision("w0", 0, 0.0, "load"), 0.0)
    router.on_first_token("s1", 0.0)
    router.on_complete("s1", 0.0, "stop", 10)
    assert router.apply_kv_batch(KvEventBatch("w0", 1, 0, 0.0, [BlockStored(chain(280, 50_000))]), 0.0)
    decoding(router, "w0", "a", 500, 50, 10_000)
    for i in range(80):
        session = f"named{i}" if i < named else None
        question = RouteRequest(f"q{i}", "m", chain(10, 90_000 + 100 * i), 10 * BS, session, 30)
        assert router.record(question, Decision("w1", 0, 0.0, "load"), 0.5)
        router.on_first_token(f"q{i}", 0.5)
    report(router, "w0", 1, 820, 1.0)
    report(router, "w1", 80, used, 1.0)
    router.load.prefill_fit.ms_per_token = 0.01  # (after the first tokens above, which the fit observes)
    return router


def test_a_turn_that_would_wait_for_memory_moves_beside_one_shot_requests() -> None:
    # s's next turn (300 blocks, 280 cached on w0) would wait ~4 s on w0. w1 runs 80 one-shot questions:
    # no worker is nearly idle, and the session estimate prices the 300 blocks the turn misses there at
    # the pool's average cost, 0.1 ms a token, with the stall of the 80 (x 17): ~8 s, so the turn stays.
    # Its prefill rides steps the questions run anyway, at the marginal cost, 0.01 ms a token (~0.8 s
    # with the stall): with the rule it moves
    turn = RouteRequest("s2", "m", chain(280, 50_000) + chain(20, 60_000), 300 * BS, "s")
    assert pool_beside_one_shot(memory_wait_one_shot=False).pick(turn, 1.0).worker_id == "w0"
    moved = pool_beside_one_shot().pick(turn, 1.0)
    assert (moved.worker_id, moved.reason) == ("w1", "memory")
    assert moved.estimated_cost == pytest.approx(300 * BS * (1 + 2.0 * 80 * 0.1 * 1.0) * 0.01)
    # a worker running a named session's turn among them is no way out (that session lives there)
    assert pool_beside_one_shot(named=1).pick(turn, 1.0).worker_id == "w0"
    # nor one where the turn would wait for memory too, nor any before the marginal cost is known
    assert pool_beside_one_shot(used=800).pick(turn, 1.0).worker_id == "w0"
    unfitted = pool_beside_one_shot()
    unfitted.load.prefill_fit.ms_per_token = None
    assert unfitted.pick(turn, 1.0).worker_id == "w0"


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
        view = RouterView(router.workers(), router.index, router.approx, router.load, None, BS, 1.5)
        waits = policy.memory_waits("w0", view)
        walk = policy._walk(view, "w0", load, policy._in_prefill_blocks(view, "w0"))
        for _ in range(5):
            prompt = chain(rng.randint(0, 50), 10_000 * rng.randint(1, 3)) + chain(
                rng.randint(1, 600), 90_000
            )
            assert waits(prompt) == walk.ms(prompt), case
            waited += walk.ms(prompt) > 0
    assert 300 < waited < 1200  # both answers were exercised
