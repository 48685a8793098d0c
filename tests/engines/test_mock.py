"""MockRunner: the Dynamo mocker timing model, speedup, placeholder tokens and optional EOS."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from engines.mock import PLACEHOLDER_TEXT, MockRunner, decode_ms, prefill_ms
from engines.runner import SamplingParams, ScheduledChunk


def chunk(n: int, output_len: int = 0, sample: bool = True, blocks: int = 1) -> ScheduledChunk:
    return ScheduledChunk("s", [1] * n, 0, list(range(blocks)), sample, SamplingParams(), output_len)


def test_the_mocker_polynomials() -> None:
    assert prefill_ms(1000) == pytest.approx(4.209989e-7 * 1e6 + 1.518344e-2 * 1000 + 16.50142)
    assert decode_ms(0.5) == pytest.approx(-25.74 * 0.25 + 54.01 * 0.5 + 5.74)
    assert decode_ms(0.0) == pytest.approx(5.74) and decode_ms(2.5) == 1.0  # floored at 1 ms


def test_step_time_sums_prefill_tokens_and_pays_decode_once() -> None:
    runner = MockRunner(100, 16)
    prefill_only = runner.step_time_s([chunk(300, sample=False, blocks=19), chunk(200, sample=False)], 0.3)
    assert prefill_only == pytest.approx(prefill_ms(500) / 1000)
    # a prompt's last chunk samples its first token: the pass pays a decode too (Dynamo's mocker), at
    # the sampling sequences' contexts over the cache (19 of 100 blocks), not the blocks in use (0.3)
    finishing = runner.step_time_s([chunk(300, blocks=19), chunk(200, sample=False, blocks=13)], 0.3)
    assert finishing == pytest.approx((prefill_ms(500) + decode_ms(0.19)) / 1000)
    decodes = [chunk(1, output_len=3, blocks=20), chunk(1, output_len=9, blocks=10)]
    decode_only = runner.step_time_s(decodes, 0.9)
    assert decode_only == pytest.approx(decode_ms(0.3) / 1000)
    mixed = runner.step_time_s([chunk(100, blocks=7), chunk(1, output_len=2, blocks=23)], 0.3)
    assert mixed == pytest.approx((prefill_ms(100) + decode_ms(0.3)) / 1000)
    # two sequences over one shared prefix count it twice, and p is capped at the whole cache
    shared = runner.step_time_s([chunk(1, output_len=1, blocks=80), chunk(1, output_len=5, blocks=80)], 0.8)
    assert shared == pytest.approx(decode_ms(1.0) / 1000) and decode_ms(1.6) < decode_ms(1.0)
    fast = MockRunner(100, 16, speedup=500)
    assert fast.step_time_s([chunk(100, sample=False)], 0.0) == pytest.approx(prefill_ms(100) / 1000 / 500)
    with pytest.raises(ValueError):
        MockRunner(100, 16, speedup=0)


def test_a_steps_decode_pass_is_the_part_its_outputs_leave_before() -> None:
    """As Dynamo's mocker sends them: after the prefill of the step's chunks, before its decode pass
    (a prompt's first token at the end of its last chunk, a decode's token at its step's start)."""
    runner = MockRunner(100, 16)
    finishing = [chunk(300, blocks=19), chunk(200, sample=False, blocks=13)]
    assert runner.decode_pass_s(19) == pytest.approx(decode_ms(0.19) / 1000)
    assert runner.step_time_s(finishing, 0.3) - runner.decode_pass_s(19) == pytest.approx(
        prefill_ms(500) / 1000
    )
    decodes = [chunk(1, output_len=3, blocks=20), chunk(1, output_len=9, blocks=10)]
    assert runner.decode_pass_s(30) == pytest.approx(runner.step_time_s(decodes, 0.9))
    assert MockRunner(100, 16, speedup=4).decode_pass_s(30) == pytest.approx(decode_ms(0.3) / 4000)


def test_the_mock_says_its_step_times_are_modelled() -> None:
    """What the engine and the bench read instead of probing `step_time_s`: the mock's time counts."""
    runner = MockRunner(100, 16)
    assert runner.models_step_time is True
    assert runner.step_time_s([], 0.0) is not None


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
    # (the chunk shares the sequence's block table, emptied since it finished)
    assert timed == MockRunner(32, 4).step_time_s([chunk(10, blocks=len(seen[0].block_table))], 0.0)
