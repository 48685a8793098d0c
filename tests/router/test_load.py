"""The load view: reports plus the predictions made since, robust to stale reports and lost completions."""

from __future__ import annotations

import pytest

from router.config import RouterConfig
from router.load import COMPACT_SLACK, LoadView
from router.protocol import LoadReport


def report(ts: float, prefill: int, speed: float = 10_000.0) -> LoadReport:
    return LoadReport("w", ts, 1, 0, prefill, 10, 100, speed, 50.0)


def view(**overrides) -> LoadView:
    load = LoadView(RouterConfig(**overrides))
    load.add_worker("w")
    return load


def test_predictions_add_to_the_report_until_the_next_report_counts_them() -> None:
    load = view()
    load.apply(report(0.0, 500), now=0.0)
    load.start("r1", "w", prefill_tokens=300, blocks=20, now=0.1)
    assert load.queued_prefill("w", 0.2) == 800
    assert load.active_blocks("w") == 20 and load.requests("w") == 1
    load.apply(report(0.3, 700), now=0.3)  # the worker now reports r1 itself
    assert load.queued_prefill("w", 0.4) == 700
    load.first_token("r1")  # r1's prefill was counted by the report, not by us: nothing to take back
    assert load.queued_prefill("w", 0.4) == 700
    assert load.active_blocks("w") == 20
    load.finish("r1")
    assert load.active_blocks("w") == 0 and load.requests("w") == 0


def test_first_token_ends_a_prediction_made_since_the_report() -> None:
    load = view()
    load.apply(report(0.0, 0), now=0.0)
    load.start("r1", "w", 400, 30, now=0.1)
    load.first_token("r1")
    load.first_token("r1")  # idempotent
    assert load.queued_prefill("w", 0.2) == 0
    assert load.active_blocks("w") == 30


def test_a_stale_report_is_ignored_and_an_overtaken_one_dropped() -> None:
    load = view(report_stale_s=1.0)
    load.apply(report(5.0, 9000, speed=20_000.0), now=5.0)
    load.apply(report(4.0, 1), now=5.1)  # older than what we have: dropped
    assert load.queued_prefill("w", 5.5) == 9000
    load.start("r1", "w", 100, 5, now=5.5)
    assert load.queued_prefill("w", 7.0) == 100  # report too old: the predictions stand alone
    assert load.prefill_speed("w") == 20_000.0


def test_lost_first_tokens_and_completions_expire() -> None:
    load = view(prefill_ttl_s=10.0, inflight_ttl_s=100.0)
    load.start("r1", "w", 100, 5, now=0.0)
    load.start("r2", "w", 200, 7, now=50.0)
    load.expire(11.0)
    assert load.queued_prefill("w", 11.0) == 200  # r1's first token never came
    assert load.active_blocks("w") == 12
    load.expire(101.0)
    assert load.active_blocks("w") == 7 and load.requests("w") == 1
    assert load.finish("r1") is None
    load.expire(151.0)
    assert load.active_blocks("w") == 0 and load.requests("w") == 0 and load.queued_prefill("w", 151.0) == 0


def test_in_flight_is_bounded() -> None:
    load = view(max_inflight=3)
    for i in range(10):
        load.start(f"r{i}", "w", 10, 1, now=float(i))
    assert load.requests("w") == 3 and load.active_blocks("w") == 3
    assert load.get("r9") is not None and load.get("r0") is None


def test_finished_requests_leave_no_queue_entries_behind() -> None:
    """A steady stream of requests, each finished: what the view keeps follows those in flight, not the
    requests seen (the expiry queues held every one for its 15 min TTL, up to 2 x max_inflight)."""
    load = view()
    for i in range(20_000):
        load.start(f"r{i}", "w", 10, 1, now=float(i))
        load.first_token(f"r{i}", now=float(i))
        load.finish(f"r{i}")
    assert load.requests("w") == 0
    assert len(load._done_queue) <= COMPACT_SLACK + 1 and len(load._prefill_queue) <= COMPACT_SLACK + 1


def test_default_speed_until_reported() -> None:
    load = view(default_prefill_tok_s=1234.0)
    assert load.prefill_speed("w") == 1234.0


def test_first_tokens_fit_the_marginal_prefill_cost() -> None:
    # each first token: its latency from the pick against the prefill the worker had to compute before
    # or with it (the in-flight prefill there at the pick plus its own)
    load = view()
    t = 0.0
    for i in range(100):
        own = 2000 if i % 4 == 0 else 100
        load.start(f"a{i}", "w", prefill_tokens=own, blocks=10, now=t)
        load.start(f"b{i}", "w", prefill_tokens=100, blocks=10, now=t)  # behind a{i}: 100 + own ahead
        b = load.get(f"b{i}")
        assert b is not None and b.prefill_ahead == own + 100
        load.first_token(f"a{i}", t + (10.0 + 0.02 * own) / 1000.0)
        load.first_token(f"b{i}", t + (10.0 + 0.02 * (own + 100)) / 1000.0)
        load.first_token(f"b{i}")  # a repeated first token (no time): not a sample
        load.finish(f"a{i}")
        load.finish(f"b{i}")
        t += 1.0
    assert load.prefill_fit.ms_per_token is not None
    assert abs(load.prefill_fit.ms_per_token - 0.02) < 1e-9


def mixed_first_tokens(**overrides) -> LoadView:
    """One-shot questions whose first tokens cost 10 ms + 0.02 ms a prefill token, and every fifth pick
    a named session's 20,000-token turn whose first token came after a 5 s wait for device memory."""
    load = view(**overrides)
    t = 0.0
    for i in range(200):
        named = i % 5 == 0
        own = 20_000 if named else (2000 if i % 4 == 1 else 100)
        load.start(f"r{i}", "w", prefill_tokens=own, blocks=10, now=t)
        flight = load.get(f"r{i}")
        assert flight is not None
        flight.session_id = "s" if named else None  # as the router notes it at the pick
        load.first_token(f"r{i}", t + (10.0 + 0.02 * own + (5000.0 if named else 0.0)) / 1000.0)
        load.finish(f"r{i}")
        t += 10.0
    return load


def test_the_marginal_cost_is_fitted_on_one_shot_first_tokens() -> None:
    # the named turns' waits would set the slope (~0.27 ms a token); fitted on the one-shot requests'
    # first tokens alone it is their prefill's, 0.02
    assert mixed_first_tokens().prefill_fit.ms_per_token == pytest.approx(0.02)
    polluted = mixed_first_tokens(fit_one_shot_only=False).prefill_fit.ms_per_token
    assert polluted is not None and polluted > 0.2


def test_first_tokens_and_completions_mark_the_steps_a_worker_runs() -> None:
    # a prefill sent before a step end seen there rides the step that began then: its first token
    # ends that step, whose length is measured; one sent later rides the step after
    load = view()
    load.start("a", "w", prefill_tokens=500, blocks=10, now=0.0)
    load.start("b", "w", prefill_tokens=300, blocks=10, now=0.01)
    load.first_token("a", 0.02)  # a step ended: b, in flight, rides the next one
    w = load.workers["w"]
    assert (w.step_end_at, w.step_prefill, w.last_step) == (0.02, 300, None)  # a's step began unseen
    load.start("c", "w", prefill_tokens=200, blocks=10, now=0.03)  # queued behind b's step
    load.first_token("b", 0.07)
    assert w.last_step is not None
    assert w.last_step[0] == 300 and abs(w.last_step[1] - 50.0) < 1e-9
    assert (w.step_end_at, w.step_prefill) == (0.07, 200)  # c rides the step begun at b's first token
    load.finish("a")
    load.step_ended("w", 0.08)  # a completion (Router.on_complete) ends a step too: c is still in flight
    assert (w.step_end_at, w.step_prefill) == (0.08, 200)
    load.first_token("c", 0.12)
    assert w.last_step[0] == 200 and abs(w.last_step[1] - 40.0) < 1e-9
    load.start("d", "w", prefill_tokens=100, blocks=10, now=0.13)
    load.first_token("d", 0.2)  # sent after the last step end: the step it rode began unseen
    assert w.last_step[0] == 200 and (w.step_end_at, w.step_prefill) == (0.2, 0)
