"""The run summary's TTFT over the turns sent: waits still open at the end are right-censored."""

from __future__ import annotations

import numpy as np
import pytest

from loadgen.metrics import RequestRecord, censored_percentile, summarize


def test_a_censored_percentile_is_exact_when_no_longer_wait_could_move_it_and_a_bound_otherwise() -> None:
    """On random samples: where the answer says exact, stretching every open wait (to any length) leaves
    the percentile as it is; where it says lower bound, stretching them raises it."""
    rng = np.random.default_rng(7)
    seen = {True: 0, False: 0}
    for _ in range(2_000):
        observed = rng.exponential(1.0, rng.integers(0, 30))
        waits = rng.uniform(0.0, 6.0, rng.integers(0, 6))
        q = float(rng.choice([50, 90, 99]))
        figure = censored_percentile(observed, waits, q)
        if not len(observed) + len(waits):
            assert figure is None
            continue
        assert figure is not None
        value, exact = figure
        stretched = float(np.percentile(np.concatenate([observed, waits + 1e6]), q))
        assert value == pytest.approx(float(np.percentile(np.concatenate([observed, waits]), q)))
        if exact:
            assert stretched == pytest.approx(value)
        else:
            assert stretched > value
        seen[exact] += 1
    assert min(seen.values()) > 200  # both answers exercised


def _record(
    start: float, end: float, ttft: float | None, *, ok: bool = True, unfinished: bool = False
) -> RequestRecord:
    return RequestRecord(
        session_id="s",
        turn=0,
        label="x",
        start=start,
        end=end,
        ok=ok,
        status=200 if ok else 0,
        ttft=ttft,
        e2e=end - start if ok else None,
        unfinished=unfinished,
    )


def test_turns_sent_count_a_turn_still_waiting_at_its_wait_and_leave_failures_out() -> None:
    """Eight turns served in 0.1-0.8 s, two still waiting when the run ended (after 30 s and 5 s), one
    failed: the plain p50 reads the eight; the turns-sent p50 the ten, exact (both waits are longer than
    the ranks it reads), the p90 and p99 lower bounds (they read a wait)."""
    served = [_record(i, i + 1.0, 0.1 * (i + 1)) for i in range(8)]
    waiting = [
        _record(60.0, 90.0, None, ok=False, unfinished=True),
        _record(85.0, 90.0, None, ok=False, unfinished=True),
    ]
    failed = [_record(10.0, 10.5, None, ok=False)]
    summary = summarize([*served, *waiting, *failed], [], [], 1, 90.0)
    assert summary["ttft_p50_ms"] == pytest.approx(450.0)
    assert summary["ttft_sent_p50_ms"] == pytest.approx(550.0)  # 0.5 and 0.6 s, ranks 4 and 5 of 10
    every_turn_sent = [0.1 * (i + 1) for i in range(8)] + [30.0, 5.0]
    assert summary["ttft_sent_p99_ms"] == pytest.approx(1e3 * float(np.percentile(every_turn_sent, 99)))
    assert summary["lower_bounds"] == ["ttft_sent_p90_ms", "ttft_sent_p99_ms"]
