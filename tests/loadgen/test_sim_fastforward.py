"""A fast-forwarded decode run leaves the engine's sequences as the real steps would have."""

from __future__ import annotations

from engines.engine import Engine, EngineConfig, EngineRequest
from engines.mock import MockRunner
from engines.runner import SamplingParams
from loadgen.sim.fastforward import FastForward


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
