from __future__ import annotations

import pytest

from router.prefill_fit import MIN_SAMPLES, PrefillFit


def test_the_slope_of_first_token_latency_over_prefill_tokens() -> None:
    fit = PrefillFit()
    for i in range(MIN_SAMPLES - 1):  # 20 ms a step, 0.015 ms a token: a short prompt, a missed document
        tokens = 150 if i % 3 else 2150
        fit.observe(tokens, 20.0 + 0.015 * tokens)
    assert fit.ms_per_token is None  # too few samples yet
    fit.observe(150, 20.0 + 0.015 * 150)
    assert fit.ms_per_token == pytest.approx(0.015)
    # noise that does not depend on the tokens leaves the slope
    for i in range(2000):
        tokens = 150 if i % 3 else 2150
        fit.observe(tokens, 20.0 + 0.015 * tokens + (7.0 if i % 2 else -7.0))
    assert fit.ms_per_token == pytest.approx(0.015, rel=0.05)


def test_no_slope_from_tokens_that_do_not_vary() -> None:
    fit = PrefillFit()
    for i in range(500):
        fit.observe(150 + i % 2, 25.0 + i % 5)
    assert fit.ms_per_token is None


def test_a_slope_that_comes_out_negative_is_none() -> None:
    fit = PrefillFit()
    for i in range(200):
        tokens = 150 if i % 2 else 2150
        fit.observe(tokens, 100.0 - 0.01 * tokens)
    assert fit.ms_per_token is None
