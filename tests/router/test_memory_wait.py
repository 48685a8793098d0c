"""The predicted wait for device memory (router/policies/memory_wait.py) and what session_kv does with it
(its reading of the router's view: test_device_waits.py)."""

from __future__ import annotations

import pytest

from router.policies.session_kv import SessionKv
from router.protocol import BlockStored, KvEventBatch, LoadReport
from router.request import Decision, RouteRequest
from router.router import Router
from tests.router.memory_pools import BS, chain, decoding, in_prefill_report, make, prefilling, report
from tests.router.policy_cases import view_of


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
    view = view_of(router, 1.0)
    assert policy.memory_wait_ms(chain(300, 30_000), "w0", view) == pytest.approx(9_000.0)
    assert policy.memory_wait_ms(chain(150, 30_000), "w0", view) == 0.0
    assert policy.memory_wait_ms(chain(300, 30_000), "w1", view) == 0.0
    # a prompt that shares its first 200 blocks with decode a takes no new blocks for them: it fits
    assert policy.memory_wait_ms(chain(200, 10_000) + chain(100, 30_000), "w0", view) == 0.0


def pool_with_a_long_decode(
    w1_running: int, w1_waiting: int = 0, session: str | None = "s", **config: object
) -> Router:
    """Session s's first turn (280 blocks) ran on w0 and is cached there; w0 now runs a 500-block
    request with 300 tokens to decode (30 s), 820 of its 1,000 blocks in use; w1 holds nothing.
    `session` None: the client names no session, and the router infers it."""
    router = make(**config)
    sid = router.resolve_session(session, chain(280, 50_000))
    first = RouteRequest("s1", "m", chain(280, 50_000), 280 * BS, sid, expected_output_tokens=10)
    assert router.record(first, Decision("w0", 0, 0.0, "load"), 0.0)
    router.on_first_token("s1", 0.0)
    router.on_complete("s1", 0.0, "stop", 10)
    assert router.apply_kv_batch(KvEventBatch("w0", 1, 0, 0.0, [BlockStored(chain(280, 50_000))]), 0.0)
    decoding(router, "w0", "a", 500, 300, 10_000)
    report(router, "w0", 1, 820, 1.0)
    report(router, "w1", w1_running, 0, 1.0, w1_waiting)
    return router


@pytest.mark.parametrize("session", ["s", None], ids=["named", "inferred"])
def test_a_turn_that_would_wait_for_memory_moves_to_an_idle_worker_with_room(session: str | None) -> None:
    # s's next turn (300 blocks, 280 of them cached on w0) does not fit beside w0's long decode: it would
    # wait ~29 s there. The estimate prices that wait as the prefill of the 120 blocks over capacity, so
    # without the rule (memory_wait_move 0) it stays; with it (the default) it goes to w1, idle, where
    # its prefill takes well under 29 s. The same where the client names no session: its second turn
    # extends the first's chain, so the router knows it for a session's, not a one-shot request
    blocks = chain(280, 50_000) + chain(20, 60_000)
    sid = pool_with_a_long_decode(0, session=session).resolve_session(session, blocks)
    assert session is not None or sid.startswith("inferred-")
    turn = RouteRequest("s2", "m", blocks, 300 * BS, sid)
    assert pool_with_a_long_decode(0, session=session, memory_wait_move=0.0).pick(turn, 1.0).worker_id == "w0"
    moved = pool_with_a_long_decode(0, session=session).pick(turn, 1.0)
    assert (moved.worker_id, moved.reason) == ("w1", "memory")
    # a worker running two requests is no way out (the wait would spread to the sessions living there),
    # nor one with a prompt queued (it is about to take blocks its report does not count yet)
    assert pool_with_a_long_decode(2, session=session).pick(turn, 1.0).worker_id == "w0"
    assert pool_with_a_long_decode(0, 1, session=session).pick(turn, 1.0).worker_id == "w0"


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
        view = view_of(router, now)
        return policy.memory_wait_ms(chain(blocks, 30_000), "w0", view)

    assert wait(1.0, 1, 1, 420, 300) == 0.0
    assert wait(1.2, 1, 1, 420, 300) == 0.0  # not yet: a completion the router has not seen, maybe
    assert wait(1.6, 1, 1, 420, 300) == (pytest.approx(8_400.0) if rule else 0.0)
    assert wait(3.0, 2, 0, 900, 600) == pytest.approx(29_500.0 if rule else 27_500.0)


def pool_beside_one_shot(named: int = 0, used: int = 690, **config: object) -> Router:
    """Session s's first turn (280 blocks) is cached on w0, which now runs a 500-block request with 50
    tokens to decode (5 s), 820 of its 1,000 blocks in use. w1 runs 80 one-shot questions (10 blocks
    each, 30 tokens to decode; `named` of them named sessions' turns instead), `used` blocks in use
    (690: room for the turn's 300 blocks and the one its first output token takes).
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
    # (the stall at w1's fullness: 690 blocks in use and the turn's 300, of 1,000)
    assert moved.estimated_cost == pytest.approx(300 * BS * (1 + 2.0 * 80 * 0.1 * 0.99) * 0.01)
    # a worker running a named session's turn among them is no way out (that session lives there)
    assert pool_beside_one_shot(named=1).pick(turn, 1.0).worker_id == "w0"
    # nor one where the turn would wait for memory too, nor any before the marginal cost is known
    assert pool_beside_one_shot(used=800).pick(turn, 1.0).worker_id == "w0"
    unfitted = pool_beside_one_shot()
    unfitted.load.prefill_fit.ms_per_token = None
    assert unfitted.pick(turn, 1.0).worker_id == "w0"
