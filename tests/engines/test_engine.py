"""Engine + scheduler + mock runner: batching, chunked prefill, preemption, aborts, and event exactness
over a long random workload."""

from __future__ import annotations

import random
from typing import Any

import msgspec
import pytest

from engines.engine import Engine, EngineConfig, EngineLoad, EngineRequest, RequestOutput
from engines.mock import MockRunner, decode_ms, prefill_ms
from engines.onboarding import Onboarding
from engines.runner import SamplingParams
from router.hashing import block_hashes
from router.index import BlockIndex
from router.protocol import KvEvent, LoadReport
from tests.engines.kv_replay import ReplayedCache, cached_set, check_invariants


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_engine(
    num_blocks: int = 64, block_size: int = 4, events: list[KvEvent] | None = None, **kwargs: Any
) -> tuple[Engine, Clock]:
    clock = Clock()
    config = EngineConfig(num_blocks=num_blocks, block_size=block_size, **kwargs)
    sink = events.extend if events is not None else None
    return Engine(config, MockRunner(num_blocks, block_size), clock, sink), clock


def drain(engine: Engine, clock: Clock, max_steps: int = 10_000) -> dict[str, list[RequestOutput]]:
    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        if not engine.has_work():
            return outputs
        result = engine.step()
        clock.now += result.duration_s
        for out in result.outputs:
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError("engine did not finish")


def request(rid: str, tokens: list[int], max_tokens: int = 4, **kwargs: object) -> EngineRequest:
    return EngineRequest(rid, tokens, SamplingParams(max_tokens=max_tokens, ignore_eos=True), **kwargs)


def test_second_request_reports_the_cached_prefix_and_events_carry_router_hashes() -> None:
    events: list[KvEvent] = []
    engine, clock = make_engine(events=events)
    prompt = [7 + i % 50 for i in range(41)]  # 10 full blocks of 4 and 1 token
    engine.add_request(request("a", prompt))
    first = drain(engine, clock)["a"]
    assert first[-1].num_cached_tokens == 0 and first[-1].finish_reason == "length"
    stored = [h for e in events if hasattr(e, "parent_hash") for h in e.block_hashes]
    assert stored[:10] == block_hashes(prompt, 4)
    engine.add_request(request("b", prompt))
    second = drain(engine, clock)["b"]
    assert second[-1].num_cached_tokens == 40
    assert [o.completion_tokens for o in second] == [1, 2, 3, 4]
    assert second[-1].prompt_tokens == 41


def test_given_prompt_hashes_are_used_instead_of_hashing() -> None:
    events: list[KvEvent] = []
    engine, clock = make_engine(events=events)
    given = [11, 22, 33, 44]  # not the hashes of the tokens: proves they are taken as given
    engine.add_request(request("a", [5] * 9, max_tokens=1, prompt_block_hashes=given))
    drain(engine, clock)
    assert [h for e in events for h in e.block_hashes] == [11, 22]  # only the 2 full blocks exist
    engine.add_request(request("b", [6] * 9, max_tokens=1, prompt_block_hashes=[11, 22]))
    assert drain(engine, clock)["b"][-1].num_cached_tokens == 8


def test_chunked_prefill_respects_the_token_budget() -> None:
    engine, _clock = make_engine(max_num_batched_tokens=16)
    engine.add_request(request("a", list(range(50)), max_tokens=2))
    steps = []
    while engine.has_work():
        result = engine.step()
        steps.append((result.num_prefill_tokens, result.num_decode_tokens, len(result.outputs)))
    assert steps == [(16, 0, 0), (16, 0, 0), (16, 0, 0), (2, 0, 1), (0, 1, 1)]


def test_max_num_seqs_bounds_the_batch() -> None:
    engine, clock = make_engine(max_num_seqs=2)
    for i in range(5):
        engine.add_request(request(f"r{i}", [i] * 10, max_tokens=3))
    result = engine.step()
    assert engine.load().running == 2 and engine.load().waiting == 3
    assert len(result.outputs) == 2
    outputs = drain(engine, clock)
    assert sorted(outputs) == [f"r{i}" for i in range(5)]


def test_preemption_recomputes_and_every_request_completes() -> None:
    # 8 blocks of 4: three sequences growing to 20 tokens (5 blocks) cannot all fit
    engine, clock = make_engine(num_blocks=8)
    for i in range(3):
        engine.add_request(request(f"r{i}", [100 + i] * 6, max_tokens=14))
    outputs = drain(engine, clock)
    assert engine.scheduler.num_preemptions > 0
    for rid in ("r0", "r1", "r2"):
        tokens = [t for out in outputs[rid] for t in out.new_token_ids]
        assert len(tokens) == 14 and outputs[rid][-1].finish_reason == "length"
    assert engine.block_manager.num_used == 0


def test_abort_waiting_and_running() -> None:
    engine, clock = make_engine(max_num_seqs=1)
    engine.add_request(request("run", [1] * 9, max_tokens=50))
    engine.add_request(request("wait", [2] * 9, max_tokens=50))
    engine.step()
    assert engine.abort("run") and engine.abort("wait") and not engine.abort("nope")
    outputs = drain(engine, clock)
    assert {rid: out[-1].finish_reason for rid, out in outputs.items()} == {"run": "abort", "wait": "abort"}
    assert engine.block_manager.num_used == 0 and not engine.has_work()


def test_eos_stops_unless_ignored_and_limits_are_enforced() -> None:
    clock = Clock()
    runner = MockRunner(16, 4, eos_after=2)
    engine = Engine(EngineConfig(num_blocks=16, block_size=4), runner, clock)
    eos = runner.tokenizer.eos_token_id
    engine.add_request(EngineRequest("a", [1, 2, 3], SamplingParams(max_tokens=10, stop_token_ids=(eos,))))
    engine.add_request(
        EngineRequest("b", [1, 2, 3], SamplingParams(max_tokens=5, stop_token_ids=(eos,), ignore_eos=True))
    )
    outputs = drain(engine, clock)
    assert outputs["a"][-1].finish_reason == "stop" and outputs["a"][-1].new_token_ids == [eos]
    assert outputs["a"][-1].completion_tokens == 3
    assert outputs["b"][-1].finish_reason == "length" and outputs["b"][-1].completion_tokens == 5
    with pytest.raises(ValueError):
        engine.add_request(request("long", [1] * 64))  # 16 blocks of 4 hold at most 63 prompt tokens
    with pytest.raises(ValueError):
        engine.add_request(request("empty", []))
    # fits as a prompt but outgrows the whole cache while decoding: finished with "length"
    engine.add_request(request("grow", [1] * 60, max_tokens=100))
    grown = drain(engine, clock)["grow"]
    assert grown[-1].finish_reason == "length" and grown[-1].completion_tokens < 100


def test_step_duration_and_measured_speeds_come_from_the_mock_model() -> None:
    engine, _ = make_engine(num_blocks=100, block_size=4)
    engine.add_request(request("a", list(range(30)), max_tokens=2))
    first = engine.step()
    # the step that ends the prompt samples its first token and then decodes the next (8 blocks of 4
    # in use): its outputs leave before that decode pass
    assert first.duration_s == pytest.approx((prefill_ms(30) + decode_ms(8 / 100)) / 1000)
    assert first.output_lead_s == pytest.approx(decode_ms(8 / 100) / 1000)
    second = engine.step()
    # its last token: nothing decodes after it, so the step is its outputs' (as Dynamo's mocker)
    assert second.duration_s == 0.0 and second.output_lead_s == 0.0 and second.outputs[0].finished
    load = engine.load()
    assert load.prefill_tok_s == pytest.approx(30 / first.duration_s)
    assert engine.step().duration_s == 0.0 and not engine.has_work()


def test_long_random_workload_events_are_exact_after_every_step() -> None:
    rng = random.Random(7)
    events: list[KvEvent] = []
    engine, clock = make_engine(40, 4, events, max_num_seqs=6, max_num_batched_tokens=24)
    replay = ReplayedCache()
    index = BlockIndex()  # the router's own index, fed the same events
    bit = index.add_worker("w", engine.config.num_blocks)
    stems = [[rng.randrange(300) for _ in range(rng.randrange(4, 30))] for _ in range(6)]
    live: dict[str, list[int]] = {}
    finished = 0
    for step in range(1500):
        if rng.random() < 0.3 and len(live) < 10:
            rid = f"r{step}"
            prompt = rng.choice(stems) + [rng.randrange(300) for _ in range(rng.randrange(1, 20))]
            engine.add_request(
                request(rid, prompt, max_tokens=rng.randrange(1, 12), session_id=f"s{step % 5}")
            )
            live[rid] = prompt
        if rng.random() < 0.03 and live:
            engine.abort(rng.choice(sorted(live)))
        if rng.random() < 0.05 and live:
            rid = rng.choice(sorted(live))
            engine.pin(f"pin{step % 4}", block_hashes(live[rid], 4), ttl_s=rng.choice([0.05, 0.5, 5.0]))
        result = engine.step()
        clock.now += result.duration_s + 0.001
        for out in result.outputs:
            if out.finished:
                live.pop(out.request_id, None)
                finished += 1
        replay.apply(events)
        assert index.apply("w", events)
        events.clear()
        running = list(engine.scheduler.running)
        check_invariants(engine.block_manager, running)
        cached = cached_set(engine.block_manager)
        assert replay.blocks == cached
        assert index.blocks_of("w") == len(cached)
        assert all(index.tiers["device"].get(h) & bit for h in cached)
        for stem in stems:
            chain = block_hashes(stem, 4)
            held = next((i for i, h in enumerate(chain) if h not in cached), len(chain))
            assert index.overlap(chain).get("w", 0) == held
    assert finished > 300
    assert engine.scheduler.num_preemptions > 0


def test_an_adopted_prompt_is_the_sequence_token_list_and_a_copied_one_is_left_alone() -> None:
    engine, clock = make_engine()
    adopted, copied = [3] * 9, [4] * 9
    engine.add_request(request("adopted", adopted, max_tokens=3), adopt_prompt=True)
    engine.add_request(request("copied", copied, max_tokens=3))
    outputs = drain(engine, clock)
    assert len(adopted) == 9 + 3  # the sequence's own list: the sampled tokens went onto it
    assert copied == [4] * 9
    assert outputs["adopted"][-1].completion_tokens == outputs["copied"][-1].completion_tokens == 3


def test_an_engine_load_becomes_the_load_report_the_worker_publishes() -> None:
    load = EngineLoad(2, 3, 400, 50, 64, 9000.0, 120.0, host_blocks=256)
    assert load.report("w0", 12.5) == LoadReport("w0", 12.5, 2, 3, 400, 50, 64, 9000.0, 120.0, 256)
    assert load.report("w0", 12.5, decode_tok_s=80.0).decode_tok_s == 80.0


class UntieredRunner:
    """A runner with no `copy_blocks`: a model that cannot move KV between tiers."""

    reads_token_ids = False
    models_step_time = False

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size

    def execute(self, chunks: object) -> list[int | None]:
        raise AssertionError("not run")

    def step_time_s(self, chunks: object, kv_usage: float) -> float | None:
        raise AssertionError("not run")


def test_a_host_tier_needs_a_runner_that_copies_blocks() -> None:
    config = EngineConfig(num_blocks=8, block_size=4, host_blocks=8)
    with pytest.raises(ValueError, match="copy_blocks"):
        Engine(config, UntieredRunner(8, 4))
    Engine(config, MockRunner(8, 4))  # the mock models its copies
    Engine(EngineConfig(num_blocks=8, block_size=4), UntieredRunner(8, 4))  # no host tier: no copies


def context_on_host_beside_a_decode(onboarding: Onboarding) -> tuple[Engine, Clock, list[int]]:
    """An engine (256 device and host blocks of 64 tokens, the mock's transfer model) whose 200-block
    context was computed and moved to the host, with a decode running that has its first token."""
    from engines.mock import TransferModel

    clock = Clock()
    engine_config = EngineConfig(num_blocks=256, block_size=64, host_blocks=256, onboarding=onboarding)
    engine = Engine(engine_config, MockRunner(256, 64, transfer=TransferModel()), clock)
    context = list(range(200 * 64))
    engine.add_request(request("turn1", context, max_tokens=1))
    drain(engine, clock)
    assert engine.offload(block_hashes(context, 64, engine_config.hash_seed)) == 200
    engine.add_request(request("decode", list(range(10**5, 10**5 + 64)), max_tokens=50))
    while not engine.step().outputs:  # the decode's first token
        pass
    return engine, clock, context


def test_layerwise_onboarding_overlaps_the_copies_with_the_steps_compute() -> None:
    """Known by construction: a 200-block context moved to the host, and its next turn admitted beside
    a running decode. Synchronously the step lasts its compute p plus the copies c (33.6 ms); layer-wise
    (32 layers) it lasts max(c, p) + min(c, p) / 32, and the turn's output and host tokens are the same."""
    from engines.mock import TransferModel

    steps = {}
    for layerwise in (False, True):
        engine, _, context = context_on_host_beside_a_decode("layerwise" if layerwise else "sync")
        engine.add_request(request("turn2", context + list(range(5 * 10**5, 5 * 10**5 + 8)), max_tokens=1))
        steps[layerwise] = engine.step()
        turn2 = next(o for o in steps[layerwise].outputs if o.request_id == "turn2")
        assert turn2.num_host_cached_tokens == 200 * 64
    copy_s = TransferModel().seconds(200, 64)
    compute_s = steps[False].duration_s - copy_s
    assert compute_s > 0
    longer, shorter = max(copy_s, compute_s), min(copy_s, compute_s)
    assert steps[True].duration_s == pytest.approx(longer + shorter / 32)
    assert [o.request_id for o in steps[True].outputs] == [o.request_id for o in steps[False].outputs]


def test_onboarding_is_asynchronous_by_default_as_vllms_offloading_connector() -> None:
    """One setting names the form (no config is two of them), "async" unless told; a form the
    engine does not know (a Struct built in code is not validated) is refused, not taken as another."""
    assert EngineConfig().onboarding == "async"
    engine, _ = make_engine(host_blocks=64)
    assert engine.scheduler.onboard_async and engine.load().onboard_async
    assert not make_engine(host_blocks=64, onboarding="sync")[0].scheduler.onboard_async
    assert not make_engine(host_blocks=64, onboarding="layerwise")[0].scheduler.onboard_async
    with pytest.raises(ValueError, match="expected one of sync, async, layerwise"):
        make_engine(host_blocks=64, onboarding="asynchronous")
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"onboarding": "both"}, EngineConfig)


class RealTimedRunner(MockRunner):
    """The mock with its time real, as the torch runner's: its copies run inside the step's time."""

    models_step_time = False

    def step_time_s(self, chunks: object, kv_usage: float) -> None:  # type: ignore[override]
        return None


def test_the_load_report_announces_the_host_links_time_per_block() -> None:
    """What a host hit costs the router prices: the mock's modelled copy of one block (64 tokens x
    128 KiB over 50 GB/s), and whether the copies hold up the step: not asynchronously, where the
    runner models them; always where they are real (the torch runner's compute waits for them);
    nothing without a host tier."""
    from engines.mock import TransferModel

    forms: dict[Onboarding, bool] = {"sync": False, "async": True, "layerwise": False}
    for onboarding, onboard_async in forms.items():
        config = EngineConfig(num_blocks=16, block_size=64, host_blocks=64, onboarding=onboarding)
        engine = Engine(config, MockRunner(16, 64, transfer=TransferModel()), Clock())
        report = engine.load().report("w0", 0.0)
        assert report.host_block_ms == pytest.approx(64 * 131_072 / 50e9 * 1000)
        assert report.onboard_async is onboard_async
    config = EngineConfig(num_blocks=16, block_size=64, host_blocks=64)  # asynchronous
    engine = Engine(config, RealTimedRunner(16, 64, transfer=TransferModel()), Clock())
    # real copies: loaded in the step that admits the request (no step lost), which waits for them
    assert not engine.scheduler.onboard_async and not engine.load().onboard_async
    engine, _ = make_engine()  # asynchronous, but with no host tier nothing is copied
    report = engine.load().report("w0", 0.0)
    assert (report.host_blocks, report.host_block_ms, report.onboard_async) == (0, 0.0, False)


def test_asynchronous_onboarding_lets_the_others_compute_while_the_copies_cross_the_link() -> None:
    """Known by construction: a 200-block context moved to the host, a decode running, and the
    context's next turn arriving. Onboarding synchronously, the step that admits the turn lasts its
    copies (199 blocks over the link, 33 ms) and the decode's token waits for them; asynchronously,
    that step is the decode alone, the turn computes nothing until its copies have landed, then its
    first chunk, and it reports the same blocks from the host."""
    from engines.mock import TransferModel

    seen = {}
    for onboard_async in (False, True):
        engine, clock, context = context_on_host_beside_a_decode("async" if onboard_async else "sync")
        engine.add_request(request("turn2", context + list(range(5 * 10**5, 5 * 10**5 + 8)), max_tokens=1))
        admitted = engine.step()
        copy_s = TransferModel().seconds(200, 64)
        clock.now += admitted.duration_s
        if not onboard_async:
            assert admitted.duration_s > copy_s
            assert [o.request_id for o in admitted.outputs] == ["decode", "turn2"]
            seen[onboard_async] = clock.now
            continue
        assert admitted.duration_s < copy_s and [o.request_id for o in admitted.outputs] == ["decode"]
        ready = engine.next_ready_at()
        assert ready == pytest.approx(clock.now - admitted.duration_s + copy_s)
        while clock.now < ready:  # the decode steps on; the turn waits for its copies
            result = engine.step()
            assert [o.request_id for o in result.outputs] == ["decode"]
            clock.now += result.duration_s
        result = engine.step()
        clock.now += result.duration_s
        turn2 = next(o for o in result.outputs if o.request_id == "turn2")
        assert turn2.num_host_cached_tokens == 200 * 64 and engine.next_ready_at() is None
        seen[onboard_async] = clock.now
    assert seen[True] > seen[False] - 0.05  # the turn itself gains nothing: it waits for its KV either way
