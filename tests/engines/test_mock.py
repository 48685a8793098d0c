"""MockRunner: the Dynamo mocker timing model, speedup, placeholder tokens and optional EOS."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from engines.mock import PLACEHOLDER_TEXT, MockRunner, decode_ms, prefill_ms
from engines.runner import SamplingParams, ScheduledChunk


def chunk(n: int, output_len: int = 0, sample: bool = True) -> ScheduledChunk:
    return ScheduledChunk("s", [1] * n, 0, [0], sample, SamplingParams(), output_len)


def test_the_mocker_polynomials() -> None:
    assert prefill_ms(1000) == pytest.approx(4.209989e-7 * 1e6 + 1.518344e-2 * 1000 + 16.50142)
    assert decode_ms(0.5) == pytest.approx(-25.74 * 0.25 + 54.01 * 0.5 + 5.74)
    assert decode_ms(0.0) == pytest.approx(5.74) and decode_ms(2.5) == 1.0  # floored at 1 ms


def test_step_time_sums_prefill_tokens_and_pays_decode_once() -> None:
    runner = MockRunner(100, 16)
    prefill_only = runner.step_time_s([chunk(300, sample=False), chunk(200, sample=False)], 0.3)
    assert prefill_only == pytest.approx(prefill_ms(500) / 1000)
    # a prompt's last chunk samples its first token: the pass pays a decode too (Dynamo's mocker)
    finishing = runner.step_time_s([chunk(300), chunk(200, sample=False)], 0.3)
    assert finishing == pytest.approx((prefill_ms(500) + decode_ms(0.3)) / 1000)
    decode_only = runner.step_time_s([chunk(1, output_len=3), chunk(1, output_len=9)], 0.3)
    assert decode_only == pytest.approx(decode_ms(0.3) / 1000)
    mixed = runner.step_time_s([chunk(100), chunk(1, output_len=2)], 0.3)
    assert mixed == pytest.approx((prefill_ms(100) + decode_ms(0.3)) / 1000)
    fast = MockRunner(100, 16, speedup=500)
    assert fast.step_time_s([chunk(100, sample=False)], 0.0) == pytest.approx(prefill_ms(100) / 1000 / 500)
    with pytest.raises(ValueError):
        MockRunner(100, 16, speedup=0)


def test_placeholder_tokens_and_eos_when_asked() -> None:
    runner = MockRunner(10, 16)
    tokens = [runner.execute([chunk(1, output_len=i)])[0] for i in range(11)]
    assert runner.tokenizer.decode(tokens) == PLACEHOLDER_TEXT[:11]
    assert runner.execute([chunk(5, sample=False)]) == [None]
    eos = MockRunner(10, 16, eos_after=2)
    assert [eos.execute([chunk(1, output_len=i)])[0] for i in range(4)][2:] == [
        eos.tokenizer.eos_token_id
    ] * 2


def test_the_engine_hands_the_mock_token_counts_not_copies_of_the_tokens() -> None:
    from engines.engine import Engine, EngineConfig, EngineRequest

    seen: list[ScheduledChunk] = []

    class Recording(MockRunner):
        def execute(self, chunks: Sequence[ScheduledChunk]) -> list[int | None]:
            seen.extend(chunks)
            return super().execute(chunks)

    engine = Engine(EngineConfig(num_blocks=32, block_size=4), Recording(32, 4), lambda: 0.0)
    engine.add_request(EngineRequest("a", list(range(10)), SamplingParams(max_tokens=2, ignore_eos=True)))
    engine.step()
    engine.step()
    assert [(c.token_ids, c.size()) for c in seen] == [([], 10), ([], 1)]
    timed = MockRunner(32, 4).step_time_s(seen[:1], 0.0)
    assert timed == MockRunner(32, 4).step_time_s([chunk(10)], 0.0)
