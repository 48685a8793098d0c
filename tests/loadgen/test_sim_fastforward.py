"""A fast-forwarded decode run leaves the engine's sequences as the real steps would have."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from engines.engine import Engine, EngineConfig, EngineRequest
from engines.mock import MockRunner
from engines.runner import SamplingParams, ScheduledChunk
from loadgen.sim.fastforward import FastForward
from router.chat import ByteTokenizer


def _engine() -> Engine:
    config = EngineConfig(num_blocks=256, block_size=16, max_num_batched_tokens=512)
    engine = Engine(config, MockRunner(config.num_blocks, config.block_size), clock=lambda: 0.0)
    # outputs of several lengths, so the runs start at different places in the placeholder text
    for i, (prompt, out) in enumerate([(40, 300), (23, 250), (64, 400)]):
        sampling = SamplingParams(max_tokens=out, ignore_eos=True)
        engine.add_request(EngineRequest(f"r{i}", [7 + i] * prompt, sampling))
    return engine


def _state(engine: Engine) -> list[tuple[str, list[int], int]]:
    return [(s.seq_id, list(s.token_ids), s.num_computed_tokens) for s in engine.scheduler.running]


def test_a_run_applied_at_once_equals_its_steps() -> None:
    fast, slow = _engine(), _engine()
    ff = FastForward(fast)
    runs = 0
    while fast.has_work():
        run = ff.plan(0.0)
        if run is None:
            fast.step()
            slow.step()
        else:
            ff.apply(run, run.steps)
            for _ in range(run.steps):
                slow.step()
            runs += 1
        assert _state(fast) == _state(slow)
    assert runs > 10 and not slow.has_work()


class _OtherRunner:
    """A model runner that is not the mock's, with a tokenizer all the same: its tokens are not the
    placeholder text's, so a fast-forward would replay the wrong ones."""

    reads_token_ids = False
    models_step_time = False

    def __init__(self, block_size: int, num_blocks: int) -> None:
        self.block_size, self.num_blocks = block_size, num_blocks
        self.tokenizer = ByteTokenizer()

    def execute(self, chunks: Sequence[ScheduledChunk]) -> list[int | None]:
        return [0 for _ in chunks]

    def step_time_s(self, chunks: Sequence[ScheduledChunk], kv_usage: float) -> float | None:
        return None


def test_another_runner_is_refused() -> None:
    config = EngineConfig(num_blocks=256, block_size=16)
    engine = Engine(config, _OtherRunner(config.block_size, config.num_blocks))
    with pytest.raises(TypeError, match="mock runner"):
        FastForward(engine)
