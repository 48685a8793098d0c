"""The busy step a request sent to a worker waits for (router/policies/busy_step.py)."""

from __future__ import annotations

import pytest

from router.load import WorkerLoad
from router.policies.busy_step import BusyStep


def test_step_left_follows_the_phase_of_the_step_in_progress() -> None:
    # the rest of the step begun at the latest step end seen (1 s); decode steps of 10 ms, a pool step
    # of 20 ms, 0.015 ms a prefill token
    wl = WorkerLoad(1000.0)
    wl.step_end_at = 1.0
    left = BusyStep.left_ms

    def at(ms: float) -> float:
        return left(wl, 1.0 + ms / 1000.0, 10.0, 20.0, 0.015)

    # decodes only: the rest of one decode step, then a whole one (the next steps end unseen)
    assert at(4.0) == pytest.approx(6.0)
    assert at(25.0) == pytest.approx(10.0)
    # a prefill of 1,200 tokens rides it; the latest prefill step seen took 50 ms over 1,000 tokens
    wl.inflight_prefill = wl.step_prefill = 1200
    assert at(4.0) == pytest.approx(10.0 + 1200 * 0.015 - 4.0)  # none measured there: a decode step
    wl.last_step = (1000, 50.0)
    assert at(13.0) == pytest.approx(50.0 + 200 * 0.015 - 13.0)
    assert at(60.0) == pytest.approx(10.0)  # past its predicted end: half a pool step
    wl.inflight_prefill = 1500  # 300 more sent after the step began wait for the next one
    assert at(13.0) == pytest.approx(50.0 + 200 * 0.015 - 13.0)


def test_the_wait_is_the_rest_of_the_step_then_the_decodes_scaled_by_context() -> None:
    # a pool step of 20 ms over 100 blocks in flight; this worker has 300 in flight: its step carries
    # three times the decodes (60 ms), after the rest of the decode step begun 4 ms ago
    wl = WorkerLoad(1000.0)
    wl.step_end_at = 1.0
    wl.inflight_blocks = 300
    decode = 20.0 * 300 / 100.0
    assert BusyStep.wait_ms(wl, 1.004, 20.0, 100.0, 0.015) == pytest.approx(decode - 4.0 + decode)
