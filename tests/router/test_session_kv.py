"""session_kv (router/policies/session_kv.py) on hand-built cases, through the Router facade: the worker
with more cached prefix unless its queue makes it slower, sessions held by their context, one-shot
traffic by its estimated TTFT, the memory and tier terms."""

from __future__ import annotations

import random
from collections import Counter

import msgspec
import pytest

from router.config import RouterConfig
from router.protocol import BlockRemoved, BlockStored, KvEventBatch, LoadReport, WorkerRegistration
from router.request import Decision, RouteRequest
from router.router import Router
from tests.router.policy_cases import BS, chain, hold, load, make, req


def fit_marginal_cost(router: Router) -> None:
    """The pool's first tokens so far: 20 ms + 0.015 ms per prefill token, as the router fits them."""
    for i in range(100):
        tokens = 100 if i % 2 else 2100
        router.load.prefill_fit.observe(tokens, 20.0 + 0.015 * tokens)


def test_session_kv_prefers_the_worker_holding_more_of_the_prompt() -> None:
    router = make("session_kv", one_shot_warmup=False)  # the average-cost estimate, no warm-up rule
    prompt = chain(200)
    hold(router, "w1", prompt[:150])
    hold(router, "w2", prompt[:50])
    d = router.pick(req("r1", prompt), 0.0)
    assert (d.worker_id, d.overlap_blocks, d.reason) == ("w1", 150, "overlap")
    expected_ms = (200 - 150) * BS / RouterConfig().default_prefill_tok_s * 1000
    assert d.estimated_cost == pytest.approx(expected_ms)


def test_session_kv_avoids_a_cached_worker_whose_queue_makes_it_slower() -> None:
    router = make("session_kv")
    prompt = chain(200)  # 3,200 tokens
    hold(router, "w1", prompt[:150])
    hold(router, "w2", prompt[:100])
    load(router, "w1", prefill=2000)  # (2000 + 800) / speed > (0 + 1600) / speed
    load(router, "w2", prefill=0)
    load(router, "w0", prefill=0)
    d = router.pick(req("r1", prompt, "s1"), 0.0)  # a named session's first turn: the cost decides
    assert d.worker_id == "w2"
    router.on_complete("r1", 0.05, "stop", 1)  # (in flight, it would credit w2 with the whole prompt)
    load(router, "w1", prefill=700)  # (700 + 800) < 1600: the cache wins again
    assert router.pick(req("r2", prompt, "s2"), 0.1).worker_id == "w1"


def test_session_kv_keeps_one_shot_traffic_with_its_prefix_home() -> None:
    # the same case without a session: a request over a shared prefix (a document) stays where the
    # prefix is until the home's queue costs more than `prefix_home_hold` x the prefix's prefill
    router = make("session_kv", prefix_home_hold=10.0, one_shot_warmup=False)
    prompt = chain(200)
    hold(router, "w1", prompt[:150])
    hold(router, "w2", prompt[:100])
    for w, queued in (("w0", 0), ("w1", 2000), ("w2", 0)):
        load(router, w, prefill=queued)
    d = router.pick(req("r1", prompt), 0.0)  # ~90 ms dearer than w2, within 10 x 240 ms
    assert (d.worker_id, d.reason) == ("w1", "overlap")
    router.on_complete("r1", 0.05, "stop", 1)
    load(router, "w1", prefill=30_000, now=0.1)  # now ~2.9 s dearer: beyond the hold
    assert router.pick(req("r2", prompt), 0.1).worker_id == "w2"
    router.on_complete("r2", 0.15, "stop", 1)
    hold(router, "w0", prompt[:150])  # w0 (listed first: the home) and w1 hold it; w2 holds less
    load(router, "w1", prefill=2000, now=0.2)
    load(router, "w0", prefill=2300, now=0.2)
    assert router.pick(req("r3", prompt), 0.2).worker_id == "w0"  # w2 would copy 50 blocks again
    router.on_complete("r3", 0.25, "stop", 1)
    load(router, "w1", prefill=0, now=0.3)  # the cheapest holds it too: no copy to spare, the cost decides
    assert router.pick(req("r3b", prompt), 0.3).worker_id == "w1"
    router.on_complete("r3b", 0.35, "stop", 1)
    # named sessions are not one-shot traffic: their first turns go by the cost
    load(router, "w0", prefill=2000, now=0.4)
    load(router, "w1", prefill=2000, now=0.4)
    assert router.pick(req("r4", prompt, "named"), 0.4).worker_id == "w2"


def test_session_kv_counts_a_prefill_in_flight_before_its_events() -> None:
    # two requests over a new document a few ms apart: the second goes where the first's prefill is
    # under way (no KV event yet), not to an idle worker to prefill the document a second time
    router = make("session_kv", n=3, prefix_home_hold=10.0, one_shot_warmup=False)  # the hold keeps it
    doc = chain(150)
    first = router.pick(req("r1", doc + chain(10, base=10_000)), 0.0)
    d = router.pick(req("r2", doc + chain(10, base=20_000)), 0.01)
    assert (d.worker_id, d.overlap_blocks, d.reason) == (first.worker_id, 150, "overlap")
    # once the first token came, the events tell (none here): the credit is gone
    router.on_first_token("r1", 0.02)
    router.on_first_token("r2", 0.02)
    d = router.pick(req("r3", doc + chain(10, base=30_000)), 0.03)
    assert d.overlap_blocks == 0 and d.worker_id != first.worker_id


def test_session_kv_credits_each_worker_the_longest_prefix_it_has_in_flight() -> None:
    # the in-flight credit skips a prefill with one compare where it cannot beat the credit so far:
    # pinned to the plain rule (per worker, the longest prefix any of its prefills shares, if longer
    # than the index's) on chains that share prefixes of every length
    from router.prefix_match import common_prefix

    rng = random.Random(3)
    for _ in range(300):
        router = make("session_kv", n=4)
        policy = router.policy
        trunk = chain(rng.randrange(1, 12))
        policy._pending.clear()
        for i in range(rng.randrange(0, 10)):
            cut = rng.randrange(0, len(trunk) + 1)
            other = trunk[:cut] + chain(rng.randrange(0, 4), base=10_000 * (i + 1))
            policy._pending[f"p{i}"] = (f"w{rng.randrange(4)}", other)
        prompt = trunk[: rng.randrange(0, len(trunk) + 1)] + chain(rng.randrange(0, 3), base=999_000)
        overlap = {f"w{w}": rng.randrange(0, len(prompt) + 1) for w in range(4) if rng.random() < 0.5}
        expected = dict(overlap)
        for worker, other in policy._pending.values():
            n = common_prefix(other, prompt) if other and prompt else 0
            if n > expected.get(worker, 0):
                expected[worker] = n
        assert policy._with_pending(overlap, prompt) == expected


def test_session_kv_prices_tokens_at_the_pool_speed() -> None:
    # a worker's measured speed mostly says how long its recent prompts were (a step's fixed cost),
    # so workers are compared by tokens at the pool's median speed (docs/EXPERIMENTS.md, idea 1)
    router = make("session_kv", n=3, stall_factor=0.0, one_shot_warmup=False)  # the cost: prefill alone
    prompt = chain(100)
    hold(router, "w0", prompt[:50])
    load(router, "w0", 0, speed=1_000.0)  # holds half, and looks 10x slower
    load(router, "w1", 0, speed=10_000.0)
    load(router, "w2", 0, speed=10_000.0)
    d = router.pick(req("r1", prompt), 0.0)
    assert d.worker_id == "w0"
    assert d.estimated_cost == pytest.approx(50 * BS / 10_000.0 * 1000)


def test_session_kv_counts_routed_blocks_before_events_confirm_them() -> None:
    router = make("session_kv", prior_ttl_s=5.0)
    turn1 = chain(100)
    w = router.pick(req("r1", turn1, "s"), 0.0).worker_id
    router.on_complete("r1", 1.0, "tool_calls", 10)
    turn2 = turn1 + chain(20, base=9000)
    d = router.pick(req("r2", turn2, "s"), 2.0)  # no event arrived yet: the prior holds
    assert (d.worker_id, d.overlap_blocks, d.reason) == (w, 100, "session")
    other = next(x for x in router.workers() if x != w)
    hold(router, other, turn2[:110])
    router.on_complete("r2", 3.0, "stop", 10)
    d = router.pick(req("r3", turn2 + chain(5, base=9500), "s"), 20.0)  # prior expired, no events for w
    assert d.worker_id == other


@pytest.mark.parametrize("hold_factor", [10.0, 0.0])
def test_session_kv_keeps_a_session_unless_moving_saves_more_than_its_context_costs(
    hold_factor: float,
) -> None:
    # a turn that leaves its session's worker computes the held context again elsewhere: with
    # `session_hold` it stays unless the worker is dearer by more than that many times the context's
    # prefill (150 blocks at 10k tokens/s: 240 ms, so 2.4 s), not merely slower by a passing queue
    router = make("session_kv", stall_factor=0.0, session_hold=hold_factor)
    turn1 = chain(150)
    hold(router, "w0", turn1)
    assert router.pick(req("r1", turn1, "s"), 0.0).worker_id == "w0"
    router.on_complete("r1", 0.5, "tool_calls", 10)
    turn2 = turn1 + chain(50, base=9000)
    for w, queued in (("w0", 5_000), ("w1", 0), ("w2", 0)):  # w0 ~0.26 s dearer than w1
        load(router, w, prefill=queued, now=1.0)
    d = router.pick(req("r2", turn2, "s"), 1.0)
    assert (d.worker_id, d.reason) == (("w0", "session") if hold_factor else ("w1", "load"))
    router.on_complete("r2", 1.5, "tool_calls", 10)
    hold(router, "w0", turn2, seq=1)
    turn3 = turn2 + chain(10, base=9500)
    for w, queued in (("w0", 40_000), ("w1", 0), ("w2", 0)):  # now ~3.8 s dearer: beyond the hold
        load(router, w, prefill=queued, now=2.0)
    if hold_factor:
        assert router.pick(req("r3", turn3, "s"), 2.0).worker_id != "w0"


@pytest.mark.parametrize("lower_tiers", [True, False])
def test_session_kv_holds_a_session_whose_context_its_worker_keeps_on_the_host(lower_tiers: bool) -> None:
    # the session's 150 blocks left w0's device for its host tier during a tool call longer than its
    # pin: staying onboards them, a move computes them again, so the hold counts them (2.4 s) and w0
    # keeps the turn though its queue makes it ~0.26 s dearer; counting the device alone, it moves
    router = make("session_kv", stall_factor=0.0, session_hold_lower_tiers=lower_tiers)
    turn1 = chain(150)
    hold(router, "w0", turn1)
    assert router.pick(req("r1", turn1, "s"), 0.0).worker_id == "w0"
    router.on_complete("r1", 0.5, "tool_calls", 10)
    offloaded = [BlockRemoved(turn1), BlockStored(turn1, None, "host")]
    assert router.apply_kv_batch(KvEventBatch("w0", 1, 1, 0.0, offloaded), 0.5)
    for w, queued in (("w0", 5_000), ("w1", 0), ("w2", 0)):
        load(router, w, prefill=queued, now=60.0)
    d = router.pick(req("r2", turn1 + chain(50, base=9000), "s"), 60.0)  # its pin (and prior) expired
    assert (d.worker_id, d.reason) == (("w0", "session") if lower_tiers else ("w1", "load"))


def next_turn_on_a_full_worker(router: Router) -> RouteRequest:
    """Session s's first turn (150 blocks) ran on w0, which now has 900 of its 1,000 blocks in use; w1 and
    w2 are idle. Returns s's next turn (200 blocks)."""
    turn1 = chain(150)
    hold(router, "w0", turn1)
    assert router.pick(req("r1", turn1, "s"), 0.0).worker_id == "w0"
    router.on_complete("r1", 0.5, "tool_calls", 10)
    router.apply_load(LoadReport("w0", 1.0, 4, 0, 5_000, 900, 1000, 10_000.0, 100.0), 1.0)
    for w in ("w1", "w2"):
        load(router, w, prefill=0, now=1.0)
    return req("r2", turn1 + chain(50, base=9000), "s")


def test_session_kv_holds_no_session_on_a_worker_it_does_not_fit() -> None:
    # the same small queue difference, but the session's worker has 900 of its 1,000 blocks in use: the
    # 200-block turn would wait there for running requests to finish, so the costs decide again
    router = make("session_kv", stall_factor=0.0)
    assert router.pick(next_turn_on_a_full_worker(router), 1.0).worker_id != "w0"


def test_session_kv_holds_a_session_that_does_not_fit_where_decodes_yield_to_prompts() -> None:
    # the case above on a worker whose engine schedules by priority: session_kv sends decodes apart
    # there, at a priority the turn's prompt outranks, so the turn preempts them rather than waits for
    # them (Router.decode_priority): the session keeps its worker, unless it sends no decodes apart
    for yields in (True, False):
        config = RouterConfig(stall_factor=0.0, yield_decodes=yields)
        router = Router(policy="session_kv", config=config, seed=1, splits_turns=True)
        for i in range(3):
            registration = WorkerRegistration(
                f"w{i}", f"http://w{i}", "m", BS, 1000, "mock", 1, 0.0, priority_threshold=10,
                returns_token_ids=True,
            )  # fmt: skip
            router.add_worker(registration, 0.0)
        assert router.decode_priority("w0") == (-11 if yields else None)
        d = router.pick(next_turn_on_a_full_worker(router), 1.0)
        assert (d.worker_id == "w0") == yields


def test_session_kv_counts_blocks_in_use_by_other_requests_as_no_new_blocks() -> None:
    # as above, but another session's request in flight on w0 holds the first 120 of the turn's blocks
    # (a system prompt they share): the turn takes only 80 new blocks, which fit in the 100 free, so the
    # session keeps its worker (w0's 5,000 queued prefill tokens stand for a queue here, not a prompt
    # in chunked prefill whose blocks `count_prefill_in_progress` would add: tests/router/test_memory_wait.py)
    router = make("session_kv", stall_factor=0.0, count_prefill_in_progress=False)
    turn1 = chain(150)
    hold(router, "w0", turn1)
    assert router.pick(req("r1", turn1, "s"), 0.0).worker_id == "w0"
    router.on_complete("r1", 0.5, "tool_calls", 10)
    assert router.pick(req("t1", turn1[:120] + chain(40, base=20_000), "t"), 0.6).worker_id == "w0"
    router.apply_load(LoadReport("w0", 1.0, 4, 0, 5_000, 900, 1000, 10_000.0, 100.0), 1.0)
    for w in ("w1", "w2"):
        load(router, w, prefill=0, now=1.0)
    d = router.pick(req("r2", turn1 + chain(50, base=9000), "s"), 1.0)
    assert (d.worker_id, d.reason) == ("w0", "session")


def test_session_kv_spreads_a_prefix_every_worker_holds() -> None:
    router = make("session_kv", n=4)
    system = chain(64)
    for i in range(4):
        hold(router, f"w{i}", system)
    picks = Counter(
        router.pick(req(f"r{i}", system + chain(8, base=10_000 + 100 * i)), 0.0).worker_id for i in range(8)
    )
    assert sorted(picks.values()) == [2, 2, 2, 2]  # in-flight prefill counts: no single hot worker


def test_session_kv_affinity_breaks_near_ties() -> None:
    router = make("session_kv", n=2)
    prompt = chain(10)
    first = router.pick(req("r1", prompt, "s"), 0.0).worker_id
    router.on_complete("r1", 1.0, "stop", 1)
    other = "w1" if first == "w0" else "w0"
    load(router, first, 10, now=100.0)  # a few queued tokens: slower by well under the tolerance
    load(router, other, 0, now=100.0)
    d = router.pick(req("r2", prompt, "s"), 100.0)
    assert (d.worker_id, d.reason) == (first, "session")


def test_session_kv_counts_a_pinned_session_as_held_until_the_pin_expires() -> None:
    router = make("session_kv", prior_ttl_s=1.0, think_default_s=20.0, pin_factor=1.0)
    turn1 = chain(100)
    w = router.pick(req("r1", turn1, "s"), 0.0).worker_id
    worker, pin = router.on_complete("r1", 1.0, "tool_calls", 10)
    assert worker == w and pin.ttl_s == 20.0
    other = next(x for x in router.workers() if x != w)
    hold(router, other, turn1[:60])  # another worker holds part of it; w's events have not come
    d = router.pick(req("r2", [*turn1, 5], "s"), 15.0)  # past the prior, within the pin
    assert (d.worker_id, d.overlap_blocks) == (w, 100)
    router.on_complete("r2", 16.0, "stop", 10)  # ended normally: no new pin
    assert router.pick(req("r3", [*turn1, 5, 6], "s"), 30.0).worker_id == other


def test_session_kv_credits_host_and_disk_tiers_partly() -> None:
    router = make("session_kv", n=4, one_shot_warmup=False)
    prompt = chain(200)
    events = {
        "w0": [BlockStored(prompt[:100])],
        "w1": [BlockStored(prompt[:100], None, "host")],
        "w2": [BlockStored(prompt[:40]), BlockStored(prompt[:100], None, "disk")],
    }
    for w, ev in events.items():
        assert router.apply_kv_batch(KvEventBatch(w, 1, 0, 0.0, ev), 0.0)
    ms = 1000 / RouterConfig().default_prefill_tok_s
    d = router.pick(req("r1", prompt), 0.0)
    assert (d.worker_id, d.estimated_cost) == ("w0", pytest.approx((3200 - 100 * BS) * ms))
    router.remove_worker("w0")
    d = router.pick(req("r2", prompt), 0.0)  # host: 0.75 x 100 blocks > disk: 40 + 0.25 x 60 blocks
    assert (d.worker_id, d.estimated_cost) == ("w1", pytest.approx((3200 - 75 * BS) * ms))
    router.remove_worker("w1")
    load(router, "w3", 0)
    d = router.pick(req("r3", prompt), 0.0)
    assert (d.worker_id, d.estimated_cost) == ("w2", pytest.approx((3200 - 55 * BS) * ms))


@pytest.mark.parametrize(
    ("link_ms", "onboard_async", "cost_ms"),
    [
        # no link time announced: the configured 0.75 x 100 blocks held, 2,000 tokens missing x 1.4
        (0.0, False, 2000 * 1.4 * 0.1),
        # synchronous: the copy stalls the step as prefill would: 0.16 / 1.6 ms of a block's prefill is
        # spent, 0.9 x 100 blocks held, 1,760 tokens missing, charged the stall like any prefill
        (0.16, False, 1760 * 1.4 * 0.1),
        # asynchronous: only the turn waits for its copies: 100 blocks held, 16 ms beside the stall
        (0.16, True, 1600 * 1.4 * 0.1 + 100 * 0.16),
        # a link slower than prefill: a synchronous host hit saves nothing
        (2.0, False, 3200 * 1.4 * 0.1),
    ],
)
def test_session_kv_prices_a_host_hit_at_the_link_time_its_worker_announces(
    link_ms: float, onboard_async: bool, cost_ms: float
) -> None:
    """Known by construction: 100 of a 200-block prompt on w0's host tier; 16 tokens a block at 0.1 ms
    a token (10,000 tokens/s) is 1.6 ms of prefill a block; one running request in a 1,000-block
    memory that the prompt fills to 20 %: a missing token is charged 1 + 2 x 1 x 0.2 = 1.4 times."""
    off = {"memory_pressure_factor": 0.0, "memory_balance_factor": 0.0}
    prompt = chain(200)
    on_host = KvEventBatch("w0", 1, 0, 0.0, [BlockStored(prompt[:100], None, "host")])
    report = LoadReport("w0", 0.0, 1, 0, 0, 0, 1000, 10_000.0, 100.0, 4000, link_ms)
    report = msgspec.structs.replace(report, onboard_async=onboard_async)
    for priced, expected in ((True, cost_ms), (False, 2000 * 1.4 * 0.1)):  # off: the constant
        router = make("session_kv", n=1, price_onboarding=priced, **off)
        assert router.apply_kv_batch(on_host, 0.0)
        router.apply_load(report, 0.0)
        assert router.pick(req("r1", prompt, "s"), 0.0).estimated_cost == pytest.approx(expected)


def test_session_kv_keeps_a_turn_on_its_host_copy_when_the_link_is_fast() -> None:
    """w0 holds 150 blocks of a 200-block prompt on its host tier behind 2,000 tokens queued; w1 holds
    nothing and is idle (nothing runs: no stall charge). At the configured 0.75 credit the idle worker
    looks cheaper (2,000 + 1,400 tokens on w0 > 3,200 on w1, at 0.1 ms a token); priced at an
    asynchronous link time of 0.05 ms a block, w0 costs 200 + 80 + 7.5 ms < 320 and takes the turn."""
    picks = {}
    for link_ms in (0.0, 0.05):
        router = make("session_kv", n=2, memory_pressure_factor=0.0, memory_balance_factor=0.0)
        prompt = chain(200)
        on_host = KvEventBatch("w0", 1, 0, 0.0, [BlockStored(prompt[:150], None, "host")])
        assert router.apply_kv_batch(on_host, 0.0)
        for w, queued in (("w0", 2000), ("w1", 0)):
            report = LoadReport(w, 0.0, 0, 0, queued, 0, 1000, 10_000.0, 100.0, 4000, link_ms)
            router.apply_load(msgspec.structs.replace(report, onboard_async=True), 0.0)
        picks[link_ms] = router.pick(req("r1", prompt, "s"), 0.0)
    assert picks[0.0].worker_id == "w1"
    assert picks[0.05].worker_id == "w0"
    assert picks[0.05].estimated_cost == pytest.approx((2000 + 800) * 0.1 + 150 * 0.05)


@pytest.mark.parametrize("memory", [True, False])
def test_session_kv_sends_a_new_session_where_its_context_fits(memory: bool) -> None:
    off = {"memory_pressure_factor": 0.0, "memory_balance_factor": 0.0, "inflight_pressure_factor": 0.0}
    router = make("session_kv", n=2, **({} if memory else off))
    system = chain(10, base=1)
    hold(router, "w0", system)  # the shared system prompt is on w0 only: TTFT alone favours w0
    for w in ("w0", "w1"):
        load(router, w, 0)  # 1,000 blocks each, nothing queued
    for i in range(2):  # two live sessions of 400 blocks go to w0, where their prefixes are
        prompt = chain(400, base=100_000 * (i + 1))
        hold(router, "w0", prompt[:390], seq=i + 1)
        for turn in range(2):  # a context counts as live once its session came back
            rid = f"a{i}.{turn}"
            assert router.pick(req(rid, prompt[: 390 + 10 * turn], f"live{i}"), 0.0).worker_id == "w0"
            router.on_first_token(rid, 0.1)
            router.on_complete(rid, 0.2, "tool_calls", 10)
    # a new 300-block session: on w0 it would push 1,100 live blocks into 1,000
    d = router.pick(req("new", system + chain(290, base=900_000), "new"), 1.0)
    assert d.worker_id == ("w1" if memory else "w0")


@pytest.mark.parametrize(("host_blocks", "expected"), [(0, "w1"), (4000, "w0"), (100, "w1")])
def test_session_kv_prices_live_blocks_a_host_tier_keeps_at_their_onboarding(
    host_blocks: int, expected: str
) -> None:
    router = make("session_kv", n=2, memory_counts_host=True)
    system = chain(60, base=1)
    hold(router, "w0", system)  # 60 blocks of the new session's prompt are on w0
    for w in ("w0", "w1"):  # 1,000 device blocks each, and `host_blocks` on the host
        router.apply_load(LoadReport(w, 0.0, 1, 0, 0, 0, 1000, 10_000.0, 100.0, host_blocks), 0.0)
    for i in range(2):  # two live sessions of 400 blocks on w0
        prompt = chain(400, base=100_000 * (i + 1))
        hold(router, "w0", prompt[:390], seq=i + 1)
        for turn in range(2):
            rid = f"a{i}.{turn}"
            assert router.pick(req(rid, prompt[: 390 + 10 * turn], f"live{i}"), 0.0).worker_id == "w0"
            router.on_first_token(rid, 0.1)
            router.on_complete(rid, 0.2, "tool_calls", 10)
    # a new 300-block session pushes 1,100 live blocks into w0's 1,000 (300 beyond 80 %): without a
    # host tier they would be computed again, 0.4 x 300 blocks > the 60 w0 saves; with one, they come
    # back from the host, 0.25 x that < 60; a host of 100 keeps too little of them
    d = router.pick(req("new", system + chain(240, base=900_000), "new"), 1.0)
    assert d.worker_id == expected


def test_session_kv_charges_a_miss_for_the_requests_it_stalls() -> None:
    # w0 holds 150 of the prompt's 200 blocks behind a long queue; w1 holds nothing and has no queue.
    # By TTFT alone the miss on w1 is faster (3,200 < 3,000 + 800 tokens); but w1's prefill would stall
    # four running requests in a full memory, so the hit waits out w0's queue instead
    router = make("session_kv", n=2, memory_pressure_factor=0.0, memory_balance_factor=0.0)
    prompt = chain(200)
    hold(router, "w0", prompt[:150])

    def report(worker: str, running: int, prefill: int) -> None:  # 250 blocks: this prompt fills 80 %
        router.apply_load(LoadReport(worker, 0.0, running, 0, prefill, 0, 250, 10_000.0, 100.0), 0.0)

    report("w0", 4, 3_000)
    report("w1", 4, 0)
    d = router.pick(req("r1", prompt, "s1"), 0.0)  # named: the cost alone decides (no prefix hold)
    stall = 1 + RouterConfig().stall_factor * 4 * 200 / 250
    assert d.worker_id == "w0"
    assert d.estimated_cost == pytest.approx((3_000 + 50 * BS * stall) / 10_000.0 * 1000)
    router.on_complete("r1", 0.0, "stop", 1)
    # where nothing runs, a miss stalls nobody: the idle worker's shorter wait wins
    report("w1", 0, 0)
    assert router.pick(req("r2", prompt, "s2"), 0.0).worker_id == "w1"
    # and without the charge the miss wins on TTFT alone
    plain = make("session_kv", n=2, memory_pressure_factor=0.0, memory_balance_factor=0.0, stall_factor=0.0)
    hold(plain, "w0", prompt[:150])
    for worker, prefill in (("w0", 3_000), ("w1", 0)):
        plain.apply_load(LoadReport(worker, 0.0, 4, 0, prefill, 0, 250, 10_000.0, 100.0), 0.0)
    assert plain.pick(req("r3", prompt, "s3"), 0.0).worker_id == "w1"


def turn_beside_running(beside: str, marginal: float | None = 0.01, **config) -> Decision:
    """A session's next turn where its worker w0, which holds its 100-block context, runs 200 requests
    (one-shot questions over a document, or other sessions' turns) in a memory 85 % full; w1 is idle.
    The pool's average prefill cost is 0.1 ms a token, its marginal cost `marginal`."""
    router = make("session_kv", n=2, **config)
    router.load.prefill_fit.ms_per_token = marginal
    context = chain(100)
    router.pick(req("t0", context, "s"), 0.0, exclude=frozenset({"w1"}))
    router.on_complete("t0", 0.5, "stop", 1)
    hold(router, "w0", context)
    for i in range(200):
        question = [*chain(20, base=5_000), 90_000 + i]
        session = None if beside == "one-shot" else f"other{i}"
        router.pick(req(f"o{i}", question, session), 1.0, exclude=frozenset({"w1"}))
    for worker, running, used in (("w0", 200, 850), ("w1", 0, 0)):
        router.apply_load(LoadReport(worker, 1.0, running, 0, 0, used, 1000, 10_000.0, 100.0), 1.0)
    return router.pick(req("t1", context + chain(8, base=70_000), "s"), 1.0)


def test_session_kv_keeps_a_turn_with_its_context_beside_running_one_shot_requests() -> None:
    # the turn's 8 new blocks on w0 stall its running requests; its whole context on w1 stalls nobody.
    # A running one-shot request is stalled at the marginal cost of a token, a tenth of the average
    # here: the 200 weigh as 20 session turns, and the turn stays with its context
    d = turn_beside_running("one-shot")
    assert (d.worker_id, d.reason) == ("w0", "session")
    full = (850 + 108) / 1000
    assert d.estimated_cost == pytest.approx(8 * BS * (1 + 2.0 * 200 * 0.1 * full) * 0.1, rel=0.01)
    # running session turns are stalled at the average cost: the charge (x 385) makes the 128 tokens
    # dearer than the 1,728 on w1 plus the session hold, and the turn moves
    d = turn_beside_running("named")
    assert d.worker_id == "w1"
    assert d.estimated_cost == pytest.approx(108 * BS * 0.1, rel=0.01)
    # so do one-shot requests before the marginal cost is fitted, and with the old pricing
    assert turn_beside_running("one-shot", marginal=None).worker_id == "w1"
    assert turn_beside_running("one-shot", stall_counts_one_shot=True).worker_id == "w1"


def test_session_kv_keeps_a_sub_agent_with_its_parent_when_they_share_a_prefix() -> None:
    router = make("session_kv", n=3)
    context = chain(100)
    hold(router, "w0", context)
    hold(router, "w1", context)  # two workers hold the parent's context (a shared system prompt, say)
    for w in ("w0", "w1", "w2"):
        load(router, w, 0)
    parent = router.pick(req("p1", context, "parent"), 0.0, exclude=frozenset({"w0"})).worker_id
    other = "w0"
    assert parent == "w1"
    router.on_complete("p1", 1.0, "tool_calls", 10)
    load(router, parent, 20, now=1.0)  # the parent's worker is a little busier than the other holder
    for w in (other, "w2"):
        load(router, w, 0, now=1.0)
    # not a child (it does not extend the parent's latest prompt): the cheaper holder
    d = router.pick(req("u1", context[:99] + chain(21, base=8000), "unrelated"), 1.0)
    assert d.worker_id == other and router.sessions.get("unrelated").parent_id is None
    prompt = context + chain(20, base=9000)
    # a named child goes with its parent, within the affinity tolerance
    child = RouteRequest("c1", "m", prompt, 120 * BS, "child", parent_session_id="parent")
    d = router.pick(child, 1.0)
    assert (d.worker_id, d.reason) == (parent, "parent")
    assert router.sessions.get("child").parent_id == "parent"
    # an unnamed parent is inferred: the child's first prompt extends the parent's chain
    d = router.pick(req("c2", context + chain(20, base=7000), "other-child"), 1.0)
    assert d.worker_id == parent and router.sessions.get("other-child").parent_id == "parent"
    # a child that shares nothing with its parent goes where it is cheapest, not to the parent
    lone = RouteRequest("c3", "m", chain(120, base=50_000), 120 * BS, "lone", parent_session_id="parent")
    d = router.pick(lone, 1.0)
    assert d.worker_id != parent and d.reason != "parent"


@pytest.mark.parametrize("named", [True, False])
def test_session_kv_prices_a_sub_agent_beside_its_parents_running_turn_by_its_new_blocks(named: bool) -> None:
    # the parent's turn (800 blocks) runs on w0, which has 1,000 blocks; w1 is idle. Its sub-agent's first
    # prompt extends the parent's (900 blocks, 800 of them the parent's: named by the header, or inferred
    # from its prompt). Counted whole, 800 + 900 blocks do not fit on w0: the in-flight pressure charges
    # 700 blocks' prefill there and the child goes to w1 to prefill all 900. The 800 its parent's turn
    # holds take no new blocks: with `parent_prefix_in_use` it fits, and goes with its parent.
    picks = []
    for rule in (False, True):
        router = make("session_kv", n=2, parent_prefix_in_use=rule)
        context = chain(800)
        parent = RouteRequest("p1", "m", context, 800 * BS, "parent", expected_output_tokens=100)
        assert router.pick(parent, 0.0, exclude=frozenset({"w1"})).worker_id == "w0"
        router.on_first_token("p1", 0.1)
        hold(router, "w0", context)
        router.apply_load(LoadReport("w0", 1.0, 1, 0, 0, 800, 1000, 10_000.0, 100.0), 1.0)
        router.apply_load(LoadReport("w1", 1.0, 0, 0, 0, 0, 1000, 10_000.0, 100.0), 1.0)
        child = RouteRequest(
            "c1",
            "m",
            context + chain(100, base=9000),
            900 * BS,
            "child",
            parent_session_id="parent" if named else None,
        )
        d = router.pick(child, 1.0)
        assert router.sessions.get("child").parent_id == "parent"
        picks.append((d.worker_id, d.reason))
    assert picks == [("w1", "load"), ("w0", "parent")]


def _turn_behind_a_queued_prompt(rule: bool, queued_blocks: int) -> tuple[bool, str, str]:
    """Session s's 500-block context is cached on w0 (1,000 blocks), where a running request holds
    500; another session's prompt of `queued_blocks` new blocks is picked for w0 (its send: True, or
    held at the router for w0's memory: False); then s's next turn is picked (worker, reason). w1 runs
    two short requests and has room."""
    router = make("session_kv", n=2, credit_survives_queue=rule)
    context = chain(500)
    assert router.pick(req("s1", context, "s"), 0.0, exclude=frozenset({"w1"})).worker_id == "w0"
    router.on_first_token("s1", 0.1)
    router.on_complete("s1", 0.5, "tool_calls", 10)
    hold(router, "w0", context)
    running = RouteRequest("r1", "m", chain(500, base=200_000), 500 * BS, "r", expected_output_tokens=5000)
    assert router.pick(running, 0.6, exclude=frozenset({"w1"})).worker_id == "w0"
    router.on_first_token("r1", 0.7)
    for i in range(2):
        other = RouteRequest(f"o{i}", "m", chain(80, base=100_000 * (i + 1)), 80 * BS, f"o{i}")
        assert router.pick(other, 1.0, exclude=frozenset({"w0"})).worker_id == "w1"
        router.on_first_token(f"o{i}", 1.1)
    router.apply_load(LoadReport("w0", 1.0, 1, 0, 0, 500, 1000, 10_000.0, 100.0), 1.0)
    router.apply_load(LoadReport("w1", 1.0, 2, 0, 0, 200, 1000, 10_000.0, 100.0), 1.0)
    queued = RouteRequest("g1", "m", chain(queued_blocks, base=50_000), queued_blocks * BS, "g")
    sent = router.room_offer(queued, router.pick(queued, 1.5, exclude=frozenset({"w1"})), 1.5)
    d = router.pick(req("s2", context + chain(20, base=9000), "s"), 2.0)
    return sent, d.worker_id, d.reason


def test_session_kv_credits_a_jammed_workers_context_only_as_far_as_it_survives_the_queue() -> None:
    # a 700-block prompt does not fit beside the running request: held at the router for w0, a jam.
    # Admitted before s's turn, its blocks evict s's context. Credited whole, w0 looks cheapest and
    # keeps the turn; credited as far as it survives (nothing), the turn goes to w1
    assert _turn_behind_a_queued_prompt(rule=False, queued_blocks=700) == (False, "w0", "session")
    assert _turn_behind_a_queued_prompt(rule=True, queued_blocks=700) == (False, "w1", "load")
    # a 450-block prompt fits and is sent: no jam, and the index's prefix stands (its blocks would
    # leave room for 50 of the context's 500, but a worker whose queue passes keeps its sessions)
    assert _turn_behind_a_queued_prompt(rule=True, queued_blocks=450) == (True, "w0", "session")


def test_session_kv_counts_a_shared_prefix_in_use_once() -> None:
    # w0 runs eight requests over one 150-block document: its report says 160 blocks are in use, where
    # the requests in flight sum to 1,280; the stall charge reads the report, not the sum
    router = make("session_kv", n=2, memory_balance_factor=0.0, one_shot_warmup=False)
    doc = chain(150)
    hold(router, "w0", doc)
    for i in range(8):
        assert router.pick(req(f"r{i}", doc + chain(10, base=10_000 * (i + 1))), 0.0).worker_id == "w0"
    for w, running, used in (("w0", 8, 160), ("w1", 0, 0)):
        router.apply_load(LoadReport(w, 0.0, running, 0, 0, used, 1000, 10_000.0, 100.0), 0.0)
    assert router.load.workers["w0"].inflight_blocks == 8 * 160
    d = router.pick(req("r9", doc + chain(10, base=99_000)), 0.0)
    assert (d.worker_id, d.reason) == ("w0", "overlap")  # the document's home, not a second copy


def test_session_kv_prices_the_rest_of_a_busy_workers_step_from_its_outputs() -> None:
    # two workers hold the document and run one request each (10 ms decode steps). On w0 a prefill
    # rides a step that began at the last first token seen there; the latest prefill step seen there,
    # over as many tokens, took 50 ms, so that one ends 50 ms after it began. On w1 only decodes run:
    # their steps end unseen, so a whole step is charged. A question goes where its step begins first.
    router = make("session_kv", n=2)
    fit_marginal_cost(router)
    doc = chain(128)
    hold(router, "w0", doc)
    hold(router, "w1", doc)
    only = {"w0": frozenset({"w1"}), "w1": frozenset({"w0"})}

    def send(rid: str, worker: str, now: float) -> None:
        router.pick(req(rid, chain(100, base=1000 * ord(rid))), now, exclude=only[worker])

    for w in ("w0", "w1"):  # one running request each, 100 decode tokens/s: 10 ms steps
        router.apply_load(LoadReport(w, -0.3, 1, 0, 0, 100, 1000, 5_000.0, 100.0), -0.3)
    send("d", "w1", -0.2)
    router.on_first_token("d", -0.17)
    send("a", "w0", -0.05)
    send("b", "w0", 0.01)
    router.on_first_token("a", 0.02)  # a step ends: b rides the next one (0.02 to 0.07)
    router.on_complete("a", 0.02, "stop", 1)
    send("c", "w0", 0.06)  # queued behind b's step, with as many tokens (the pool's step: 10 ms)
    router.on_first_token("b", 0.07)  # b's step took 50 ms; c's begins now
    router.on_complete("b", 0.07, "stop", 1)
    router.load.prefill_fit.ms_per_token = 0.015  # the first tokens above were samples too
    question = doc + chain(8, base=70_000)
    own = 8 * BS * 0.015  # the question's own prefill, alike on both
    d = router.pick(req("q1", question), 0.075)  # 45 ms of c's step left on w0
    assert d.worker_id == "w1"
    assert d.estimated_cost == pytest.approx(own + 10.0 + 10.0)  # a whole step, then its own
    router.on_complete("q1", 0.08, "stop", 1)
    d = router.pick(req("q2", question), 0.115)  # 5 ms left
    assert d.worker_id == "w0"
    assert d.estimated_cost == pytest.approx(own + 5.0 + 10.0)


def test_session_kv_counts_one_shot_requests_as_no_live_context() -> None:
    router = make("session_kv", n=2)
    for i in range(5):
        router.pick(req(f"r{i}", chain(50, base=1000 * (i + 1)), router.resolve_session(None, [])), 0.0)
    assert not router.policy._live  # inferred, never came back
    router.pick(req("n1", chain(50, base=90_000), "named"), 0.0)
    assert not router.policy._live  # a first turn: the session has not come back yet
    router.on_complete("n1", 0.5, "tool_calls", 5)
    router.pick(req("n2", chain(60, base=90_000), "named"), 1.0)
    assert set(router.policy._live) == {"named"}


def test_session_kv_places_one_shot_traffic_by_its_estimated_ttft() -> None:
    # a request that named no session: prefill at the pool's marginal cost per token, plus a busy
    # worker's steps (docs/SESSION_KV.md, "One-shot traffic"); a copy of a document on an idle worker
    # beats waiting behind a busy home's decodes, not behind a light one's. The estimate alone: the
    # credit `copy_value` adds to a copy is pinned by the tests after this one
    router = make("session_kv", n=2, copy_value=False)
    fit_marginal_cost(router)
    doc = chain(128)
    hold(router, "w0", doc)
    # w0 runs one request of 100 blocks (its first token came, on the line above)
    router.pick(req("busy", chain(100, base=50_000), "s"), 0.0, exclude=frozenset({"w1"}))
    router.on_first_token("busy", (20.0 + 0.015 * 1600) / 1000.0)
    assert router.load.prefill_fit.ms_per_token == pytest.approx(0.015)

    def report(now: float, running: int) -> None:  # 100 decode tokens/s: a step of 10 ms per request
        router.apply_load(LoadReport("w0", now, running, 0, 0, 228, 1000, 5_000.0, 100.0), now)
        router.apply_load(LoadReport("w1", now, 0, 0, 0, 0, 1000, 5_000.0, 0.0), now)

    question = doc + chain(8, base=70_000)
    report(0.1, running=1)
    d = router.pick(req("q1", question), 0.1)
    # w0: its 8 blocks at 0.015 + a 10 ms step to wait out + one as long as its 100 in-flight context
    # blocks over the busy workers' median (100) make it; w1: the document and the question
    assert (d.worker_id, d.reason) == ("w0", "overlap")
    assert d.estimated_cost == pytest.approx(128 * 0.015 + 10.0 * (1 + 100 / 100))
    router.on_complete("q1", 0.15, "stop", 1)
    report(0.3, running=4)  # the home's steps now take 40 ms: a copy on w1 (2,176 tokens, 33 ms) is faster
    d = router.pick(req("q2", question), 0.3)
    assert (d.worker_id, d.reason) == ("w1", "load")
    assert d.estimated_cost == pytest.approx(136 * BS * 0.015)
    router.on_complete("q2", 0.35, "stop", 1)
    # a named session's first turn goes by the session cost: the miss at the pool's average speed
    assert router.pick(req("q3", question, "named"), 0.4).worker_id == "w0"
    # and so does one-shot traffic with the estimate switched off
    off = make("session_kv", n=2, one_shot_ttft=False)
    off.load.prefill_fit.ms_per_token = 0.015
    hold(off, "w0", doc)
    off.pick(req("busy", chain(100, base=50_000), "s"), 0.0, exclude=frozenset({"w1"}))
    off.apply_load(LoadReport("w0", 0.3, 4, 0, 0, 228, 1000, 5_000.0, 100.0), 0.3)
    off.apply_load(LoadReport("w1", 0.3, 0, 0, 0, 0, 1000, 5_000.0, 0.0), 0.3)
    assert off.pick(req("q2", question), 0.3).worker_id == "w0"


def test_session_kv_credits_a_copy_of_a_hot_document_what_it_spares_later_requests() -> None:
    # `copy_value`: the case above with the home's steps at 10 ms. Waiting there (22 ms) beats a copy on
    # the idle worker (33 ms) for this request, but the document was asked about 20 times in the last
    # 20 s, so a copy can expect ~18 more within live_session_s (the decayed count); a quarter of them
    # (the home busy, the copy idle) would wait ~20 ms less: ~90 ms, more than the copy's prefill, so
    # the copy costs no more than a hit
    def route(total_blocks: int = 1000, copy_value: bool = True) -> tuple[str, float]:
        router = make("session_kv", n=2, copy_value=copy_value)
        fit_marginal_cost(router)
        doc = chain(128)
        hold(router, "w0", doc)
        for i in range(20):  # one request a second over the document, each alone on the pool
            rid = f"q{i}"
            assert router.pick(req(rid, doc + chain(8, base=70_000 + 10 * i)), float(i)).worker_id == "w0"
            router.on_complete(rid, i + 0.5, "stop", 1)
        router.pick(req("busy", chain(100, base=50_000), "s"), 20.0, exclude=frozenset({"w1"}))
        router.on_first_token("busy", 20.044)
        router.apply_load(LoadReport("w0", 20.1, 1, 0, 0, 228, total_blocks, 5_000.0, 100.0), 20.1)
        router.apply_load(LoadReport("w1", 20.1, 0, 0, 0, 0, total_blocks, 5_000.0, 0.0), 20.1)
        d = router.pick(req("q", doc + chain(8, base=90_000)), 20.1)
        return d.worker_id, d.estimated_cost

    assert route() == ("w1", pytest.approx(8 * BS * 0.015))  # the copy, priced as a hit would be
    worker, cost = route(copy_value=False)  # its own TTFT alone: the home
    assert worker == "w0" and cost < 136 * BS * 0.015
    # a copy of every hot document on every worker (2 x 128 blocks) and the 228 in use do not fit in
    # 2 x 200 blocks: copies would evict one another, the copy is not credited
    assert route(total_blocks=200)[0] == "w0"


def test_session_kv_gives_a_document_home_no_preference_where_another_holder_is_cheaper() -> None:
    # `copy_value`: two workers hold the document, so the home (the first listed) is one holder among
    # others, and keeping requests there within the 2 ms tolerance would leave the other copy idle
    def route(copy_value: bool) -> str:
        router = make("session_kv", n=2, copy_value=copy_value)
        fit_marginal_cost(router)
        doc = chain(128)
        hold(router, "w0", doc)
        hold(router, "w1", doc)
        # w0 has a 100-token prefill queued (1.5 ms at the marginal cost), w1 nothing
        router.pick(req("p", chain(6, base=50_000), tokens=100), 0.0, exclude=frozenset({"w1"}))
        router.on_first_token("p", 0.01)
        router.pick(req("p2", chain(6, base=60_000), tokens=100), 0.02, exclude=frozenset({"w1"}))
        return router.pick(req("q", doc + chain(8, base=70_000)), 0.02).worker_id

    assert route(copy_value=True) == "w1"
    assert route(copy_value=False) == "w0"  # within the tolerance: the home


def test_session_kv_places_one_shot_traffic_by_dynamos_cost_until_the_marginal_cost_is_known() -> None:
    # no first token yet, so no marginal prefill cost: a request that named no session is priced as
    # Dynamo's router prices it, prefill blocks + the distinct blocks in flight with its own
    router = make("session_kv", n=3)
    doc, other = chain(128), chain(128, base=50_000)
    hold(router, "w0", doc)
    hold(router, "w0", other, seq=1)
    policy = router.policy
    assert router.load.prefill_fit.ms_per_token is None and policy._warmup.on
    router.pick(req("a", doc + chain(8, base=60_000), "s"), 0.0, exclude=frozenset({"w1", "w2"}))
    assert policy._warmup.blocks is None  # a named session's turn: nothing counted yet
    router.on_first_token("a", 0.05)
    question = doc + chain(8, base=70_000)
    d = router.pick(req("q1", question), 0.1)
    # w0: 8 blocks to prefill + 136 in flight + the question's 8 (the document counts once): 152;
    # an idle worker: 136 + 136
    assert (d.worker_id, d.overlap_blocks, d.reason, d.estimated_cost) == ("w0", 128, "overlap", 152)
    router.on_complete("q1", 0.15, "stop", 1)
    router.pick(req("b", other + chain(8, base=80_000)), 0.2, exclude=frozenset({"w1", "w2"}))
    router.on_first_token("b", 0.25)
    # w0 now also runs a request over another document: 8 + 136 + 136 + 8 = 288 > 272, a copy is cheaper
    d = router.pick(req("q2", question), 0.3)
    assert d.worker_id in ("w1", "w2") and (d.reason, d.estimated_cost) == ("load", 272)
    # completions take their blocks out of the count; a named session is not one-shot traffic
    for rid in ("a", "b", "q2"):
        router.on_complete(rid, 0.4, "stop", 1)
    assert not policy._warmup.blocks["w0"] and not policy._warmup.blocks[d.worker_id]
    named = router.pick(req("n1", question, "named"), 0.5)  # the session estimate: ms at the pool's speed
    speed = RouterConfig().default_prefill_tok_s  # no worker reported one
    assert (named.worker_id, named.estimated_cost) == ("w0", pytest.approx(8 * BS / speed * 1000))


def test_session_kv_warm_up_ends_once_the_marginal_cost_is_fitted() -> None:
    router = make("session_kv", n=2)
    doc = chain(128)
    hold(router, "w0", doc)
    router.pick(req("a", doc + chain(8, base=60_000)), 0.0)
    assert router.policy._warmup.on and router.policy._warmup.blocks
    fit_marginal_cost(router)
    d = router.pick(req("q", doc + chain(8, base=70_000)), 0.1)
    assert not router.policy._warmup.on and router.policy._warmup.blocks is None  # for good
    assert d.worker_id == "w0" and d.estimated_cost < 136  # in ms, not blocks
    router.on_complete("a", 0.2, "stop", 1)  # nothing left to count
    off = make("session_kv", n=2, one_shot_warmup=False)
    hold(off, "w0", doc)
    assert not off.policy._warmup.on
    assert off.pick(req("q", doc + chain(8, base=70_000)), 0.0).estimated_cost == pytest.approx(
        8 * BS / RouterConfig().default_prefill_tok_s * 1000
    )


def test_session_kv_holds_a_document_home_while_its_copies_would_crowd_the_pool() -> None:
    # the copy of the case above (a busy home, an idle worker without the document) is made while the
    # copies of the documents one-shot traffic keeps asking about fit in the pool beside the blocks its
    # running requests use; once one more copy would not fit, it evicts another hot document: the home
    # holds
    def route_q2(total_blocks: int, **config) -> str:
        router = make("session_kv", n=2, **config)
        fit_marginal_cost(router)
        doc = chain(128)
        hold(router, "w0", doc)
        for i, other in enumerate((chain(128, base=5_000), chain(128, base=6_000))):  # on both workers
            hold(router, "w0", other, seq=1 + i)
            hold(router, "w1", other, seq=i)
        router.pick(req("busy", chain(100, base=50_000), "s"), 0.0, exclude=frozenset({"w1"}))
        router.on_first_token("busy", 0.044)
        router.apply_load(LoadReport("w0", 0.3, 4, 0, 0, 228, total_blocks, 5_000.0, 100.0), 0.3)
        router.apply_load(LoadReport("w1", 0.3, 0, 0, 0, 0, total_blocks, 5_000.0, 0.0), 0.3)
        for i, base in enumerate((5_000, 6_000)):  # one request over each of the other documents
            rid = f"other{i}"
            router.pick(req(rid, chain(128, base=base) + chain(8, base=80_000 + 10 * i)), 0.3)
            router.on_complete(rid, 0.3, "stop", 1)
        return router.pick(req("q2", doc + chain(8, base=70_000)), 0.3).worker_id

    # 3 hot documents: 5 copies of 128 blocks, 6 with the new one, and 228 blocks in use: 996 > 2 x 400
    assert route_q2(400) == "w0"
    assert route_q2(400, crowded_prefix_hold=0.0) == "w1"  # the copy, as above
    assert route_q2(1000) == "w1"  # 996 blocks fit in 2,000: a copy spreads the traffic


def one_shot_beside_live_sessions(**config: object) -> Router:
    """w0 keeps two named sessions' live contexts (450 blocks each: 900 of its 1,000, beyond the 800 the
    memory terms leave free) and runs nothing; w1 keeps none and runs six requests (60 ms steps). Both
    hold a 32-block document. The pool's average prefill cost is 0.2 ms a token, its marginal 0.015."""
    router = make("session_kv", n=2, copy_value=False, **config)
    for s, base in (("a", 100_000), ("b", 200_000)):
        router.pick(req(f"{s}1", chain(400, base=base), s), 0.0, exclude=frozenset({"w1"}))
        router.on_complete(f"{s}1", 0.1, "tool_calls", 5)
        router.pick(req(f"{s}2", chain(450, base=base), s), 0.2, exclude=frozenset({"w1"}))
        router.on_complete(f"{s}2", 0.3, "stop", 5)
    hold(router, "w0", chain(32))
    hold(router, "w1", chain(32))
    for i in range(6):
        router.pick(req(f"o{i}", chain(10, base=300_000 + 100 * i)), 0.4, exclude=frozenset({"w0"}))
    router.apply_load(LoadReport("w0", 0.5, 0, 0, 0, 0, 1000, 5_000.0, 0.0), 0.5)
    router.apply_load(LoadReport("w1", 0.5, 6, 0, 0, 60, 1000, 5_000.0, 100.0), 0.5)
    router.load.prefill_fit.ms_per_token = 0.015
    return router


def test_session_kv_charges_a_one_shot_request_its_own_share_of_the_live_excess() -> None:
    # a question over the document (40 blocks): on w0 its 8 new blocks at 0.015 ms a token, the live
    # blocks' balance (9 blocks' prefill at 3.2 ms) and the pressure of at most its own 40 blocks of the
    # excess (x 0.4): 82 ms, faster than a place beside w1's six decodes. Charged the sessions' whole
    # excess (140 blocks) it looks 210 ms dear and goes to w1
    question = req("q", chain(32) + chain(8, base=70_000))
    d = one_shot_beside_live_sessions().pick(question, 0.6)
    assert (d.worker_id, d.estimated_cost) == ("w0", pytest.approx(8 * BS * 0.015 + (9 + 40 * 0.4) * 3.2))
    assert one_shot_beside_live_sessions(one_shot_own_excess=False).pick(question, 0.6).worker_id == "w1"
