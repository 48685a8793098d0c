"""Each baseline policy on hand-built cases, through the Router facade: each chooses what its published
rule chooses (session_kv's cases: test_session_kv.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from router.request import RouteRequest
from tests.router.policy_cases import BS, chain, hold, load, make, req


def test_round_robin_cycles_and_skips_excluded() -> None:
    router = make("round_robin")
    picks = [router.pick(req(f"r{i}", chain(4)), 0.0).worker_id for i in range(4)]
    assert picks == ["w0", "w1", "w2", "w0"]
    assert router.pick(req("x", chain(4)), 0.0, exclude=frozenset({"w1", "w2"})).worker_id == "w0"


def test_random_is_seeded_and_uniform_enough() -> None:
    a = [make("random").pick(req(f"r{i}", []), 0.0).worker_id for i in range(1)]
    b = [make("random").pick(req(f"r{i}", []), 0.0).worker_id for i in range(1)]
    assert a == b
    router = make("random")
    counts = Counter(router.pick(req(f"r{i}", []), 0.0).worker_id for i in range(300))
    assert set(counts) == {"w0", "w1", "w2"} and min(counts.values()) > 60


def test_least_loaded_counts_requests_in_flight() -> None:
    router = make("least_loaded")
    hold(router, "w0", chain(50))  # cache is no attraction to it
    picks = [router.pick(req(f"r{i}", chain(50)), 0.0).worker_id for i in range(3)]
    assert sorted(picks) == ["w0", "w1", "w2"]
    router.on_complete("r1", 1.0, "stop", 1)
    assert router.pick(req("r9", chain(50)), 1.0).worker_id == picks[1]


def test_session_sticky_is_a_consistent_hash_of_the_session() -> None:
    router = make("session_sticky", n=5)
    owners = {f"s{i}": router.pick(req(f"r{i}", [], f"s{i}"), 0.0).worker_id for i in range(40)}
    assert len(set(owners.values())) >= 4
    for i in range(40):  # same session, same worker, whatever the load
        assert router.pick(req(f"again{i}", [], f"s{i}"), 0.0).worker_id == owners[f"s{i}"]
    router.remove_worker("w3")
    for i in range(40):  # only the sessions of the worker that left move
        worker = router.pick(req(f"after{i}", [], f"s{i}"), 0.0).worker_id
        assert worker != "w3"
        if owners[f"s{i}"] != "w3":
            assert worker == owners[f"s{i}"]


def dynamo_logit(prefill_tokens: int, isl: int, overlap: int, decode_blocks: int) -> float:
    return (prefill_tokens + isl - overlap * BS) / BS + decode_blocks


def test_kv_overlap_minimises_dynamo_cost() -> None:
    router = make("kv_overlap")
    prompt = chain(100)
    hold(router, "w0", prompt[:80])
    hold(router, "w1", prompt[:30])
    d = router.pick(req("r1", prompt), 0.0)
    assert (d.worker_id, d.overlap_blocks, d.reason) == ("w0", 80, "overlap")
    assert d.estimated_cost == dynamo_logit(0, 1600, 80, 100)  # its own 100 blocks count as decode
    # r1 prefills 20 blocks on w0 and holds 100 there: r2 = the same prompt costs w0 20 + 5 + 100 (the
    # shared blocks count once), w1 70 + 100; the worker's load reports play no part
    load(router, "w0", 0)
    d = router.pick(req("r2", prompt), 0.0)
    assert d.worker_id == "w0" and d.estimated_cost == dynamo_logit(320, 1600, 80, 100)
    # another prompt: w0 now carries 40 blocks of prefill in flight and 100 active blocks
    other = chain(100, base=5000)
    d = router.pick(req("r3", other), 0.0)
    assert d.worker_id == "w1" or d.worker_id == "w2"
    assert d.estimated_cost == dynamo_logit(0, 1600, 0, 100)


def test_kv_overlap_tracks_prefill_until_the_first_token_and_blocks_until_completion() -> None:
    router = make("kv_overlap", n=2)
    a, b = chain(10), chain(10, base=5000)
    first = router.pick(req("r1", a), 0.0).worker_id
    other = "w1" if first == "w0" else "w0"
    assert router.pick(req("r2", b), 0.0).worker_id == other  # r1's 10 + 10 blocks make first dearer
    policy = router.policy
    router.on_first_token("r1", 0.1)
    assert policy._active[first].prefill_tokens == 0 and len(policy._active[first].blocks) == 10
    router.on_complete("r1", 0.2, "stop", 1)
    assert not policy._active[first].blocks
    assert policy._active[other].prefill_tokens == 160  # r2 has not produced a token yet


def test_kv_overlap_breaks_ties_at_random_and_samples_with_a_temperature() -> None:
    router = make("kv_overlap")
    seen = Counter()
    for i in range(300):  # all tie every time (each request completes before the next)
        seen[router.pick(req(f"r{i}", chain(4)), 0.0).worker_id] += 1
        router.on_complete(f"r{i}", 0.0, "stop", 1)
    assert set(seen) == {"w0", "w1", "w2"} and min(seen.values()) > 60
    hot = make("kv_overlap", kv_temperature=1.0)
    hold(hot, "w0", chain(100))
    seen = Counter()
    for i in range(300):
        seen[hot.pick(req(f"r{i}", chain(100)), 0.0).worker_id] += 1
        hot.on_complete(f"r{i}", 0.0, "stop", 1)
    # logits 100, 200, 200: normalised 0, 1, 1; weights 1, e^-1, e^-1 -> w0 about 58 %
    assert 140 < seen["w0"] < 210 and seen["w1"] > 30 and seen["w2"] > 30


def test_cache_aware_matches_routed_requests_above_the_threshold() -> None:
    router = make("cache_aware")
    prompt = chain(100)
    first = router.pick(req("r1", prompt), 0.0)
    assert (first.worker_id, first.reason) == ("w0", "least_loaded")  # all idle: the first listed
    router.on_complete("r1", 1.0, "stop", 1)
    hold(router, "w2", prompt)  # events do not feed SGLang's tree
    d = router.pick(req("r2", prompt[:60] + chain(40, base=7000)), 1.0)  # 60% matched > 0.3
    assert (d.worker_id, d.reason) == ("w0", "cache")
    # 20% <= 0.3 (r2 still running): the least loaded, the first listed among the idle; not w2, whose
    # tree is as small but which holds the prefix in its KV cache
    d = router.pick(req("r3", prompt[:20] + chain(80, base=8000)), 1.0)
    assert (d.worker_id, d.reason) == ("w1", "least_loaded")
    sizes = {w: router.policy.tree.blocks_of(w) for w in router.workers()}
    assert sizes == {"w0": 140, "w1": 100, "w2": 0}


def test_cache_aware_gives_a_shared_prefix_to_the_worker_that_first_held_it() -> None:
    """Equal matches go to the tenant that created the deepest matched node of SGLang's tree."""
    router = make("cache_aware", n=2, balance_abs_threshold=0, balance_rel_threshold=1.0)
    prefix = chain(64)
    assert router.pick(req("q", chain(64, base=5000)), 0.0).worker_id == "w0"  # a miss: the first listed
    d = router.pick(req("p1", prefix), 0.0)  # 1 - 0 > 0 and 1 > 1.0 x 0: imbalanced
    assert (d.worker_id, d.reason) == ("w1", "balance")  # w1 is the first to hold the prefix
    router.on_complete("q", 1.0, "stop", 1)
    d = router.pick(req("p2", prefix + chain(8, base=9000)), 1.0)  # now w1 is the busy one
    assert (d.worker_id, d.reason) == ("w0", "balance")
    router.on_complete("p1", 2.0, "stop", 1)
    router.on_complete("p2", 2.0, "stop", 1)
    for i in range(3):  # both trees hold the 64 blocks: the first holder wins, every time
        d = router.pick(req(f"p{i + 3}", prefix + chain(8, base=10_000 + 100 * i)), 3.0)
        assert (d.worker_id, d.reason) == ("w1", "cache"), i
        router.on_complete(f"p{i + 3}", 3.0, "stop", 1)


def test_cache_aware_gate_sends_imbalanced_load_to_the_shortest_queue() -> None:
    router = make("cache_aware", n=2, balance_abs_threshold=4, balance_rel_threshold=1.5)
    prompt = chain(64)
    owner = router.pick(req("r0", prompt), 0.0).worker_id
    for i in range(1, 5):  # all match the owner's tree: it fills while the other stays empty
        d = router.pick(req(f"r{i}", prompt), 0.0)
        assert d.worker_id == owner, i
    d = router.pick(req("r5", prompt), 0.0)  # 5 - 0 > 4 and 5 > 1.5 x 0
    assert d.reason == "balance" and d.worker_id != owner


def test_baselines_get_no_pins_unless_asked() -> None:
    for policy, pins in (("kv_overlap", False), ("session_kv", True)):
        for ablation in (False, True):
            router = make(policy, pin_baselines=ablation)
            router.pick(RouteRequest("r1", "m", chain(8), 128, "s1", tool_call_pending=True), 0.0)
            hint = router.on_complete("r1", 1.0, "tool_calls", 5)
            assert (hint is not None) == (pins or ablation), (policy, ablation)


@pytest.mark.parametrize(
    "policy",
    ["round_robin", "random", "least_loaded", "session_sticky", "kv_overlap", "cache_aware", "session_kv"],
)
def test_every_decision_carries_worker_overlap_cost_and_reason(policy: str) -> None:
    router = make(policy)
    prompt = chain(30)
    hold(router, "w0", prompt)
    d = router.pick(req("r1", prompt, "s"), 0.0)
    assert d.worker_id in router.workers()
    assert d.overlap_blocks == (30 if d.worker_id == "w0" else 0)
    assert isinstance(d.estimated_cost, float) and d.reason


def test_kv_overlap_with_a_temperature_samples_and_prefers_the_cheaper() -> None:
    router = make("kv_overlap", n=2, kv_temperature=0.5)
    prompt = chain(100)
    hold(router, "w0", prompt)
    picks = Counter()
    for i in range(200):
        picks[router.pick(req(f"r{i}", prompt), 0.0).worker_id] += 1
        router.on_complete(f"r{i}", 0.0, "stop", 0)
    assert picks["w0"] > picks["w1"] > 0
