"""The torch runner behind the real Engine (scheduler + block manager with prefix caching): greedy
generation through cache hits, chunked prefill, batching and preemption equals generation from a
cold cache."""

from __future__ import annotations

import random
from pathlib import Path

import msgspec
import pytest

pytest.importorskip("torch")  # the whole module needs it: skipped without


from engines.engine import Engine, EngineConfig, EngineRequest
from engines.runner import SamplingParams
from router.chat import ByteTokenizer, encode_chat
from tests.engines.test_torch_checkpoint import QWEN2, write_checkpoint
from tests.engines.test_torch_runner import make_runner

BLOCK = 16


def make_engine(num_blocks: int = 256, **kwargs: int) -> Engine:
    runner = make_runner(num_blocks, BLOCK, seed=3)
    return Engine(EngineConfig(num_blocks=num_blocks, block_size=BLOCK, **kwargs), runner)


def run(
    engine: Engine, prompts: dict[str, list[int]], max_tokens: int = 24
) -> dict[str, tuple[list[int], int]]:
    """Generate greedily for all prompts at once: request id -> (output tokens, cached prompt tokens)."""
    for rid, tokens in prompts.items():
        sampling = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        engine.add_request(EngineRequest(rid, tokens, sampling))
    out: dict[str, list[int]] = {rid: [] for rid in prompts}
    cached: dict[str, int] = {}
    for _ in range(10_000):
        if not engine.has_work():
            return {rid: (out[rid], cached[rid]) for rid in prompts}
        for o in engine.step().outputs:
            out[o.request_id].extend(o.new_token_ids)
            if o.finished:
                assert o.finish_reason == "length"
                cached[o.request_id] = o.num_cached_tokens
    raise AssertionError("engine did not finish")


def chat(turns: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    messages = [{"role": "system", "content": "You are a coding agent. Use the tools. " * 3}]
    for t in range(turns):
        messages.append({"role": "user", "content": f"step {t}: " + "".join(rng.choices("abcdef ", k=40))})
    return encode_chat(messages, ByteTokenizer())  # the tiny model's tokenizer


@pytest.fixture(scope="module")
def cold_outputs() -> dict[str, list[int]]:
    """Each prompt alone on a fresh engine: no prefix cache can help."""
    outputs = {}
    for rid, tokens in PROMPTS.items():
        outputs[rid] = run(make_engine(), {rid: tokens})[rid][0]
    return outputs


PROMPTS = {f"turn{t}": chat(t + 1, seed=1) for t in range(4)} | {"other": chat(2, seed=9)}


def test_repeated_prompt_hits_the_cache_and_generates_the_same(cold_outputs: dict[str, list[int]]) -> None:
    engine = make_engine()
    prompt = PROMPTS["turn2"]
    first, cached_first = run(engine, {"a": prompt})["a"]
    second, cached_second = run(engine, {"b": prompt})["b"]
    assert cached_first == 0
    assert cached_second == (len(prompt) - 1) // BLOCK * BLOCK  # all full blocks, one token computed
    assert first == second == cold_outputs["turn2"]
    assert len(set(first)) > 2  # a model stuck on one token would make these comparisons weak


def test_agent_turns_through_a_warm_cache_generate_as_cold(cold_outputs: dict[str, list[int]]) -> None:
    engine = make_engine()
    for t in range(4):
        rid = f"turn{t}"
        tokens, cached = run(engine, {rid: PROMPTS[rid]})[rid]
        assert tokens == cold_outputs[rid]
        if t:  # each turn extends the last one's prompt, whose full blocks are cached
            assert cached >= len(PROMPTS[f"turn{t - 1}"]) // BLOCK * BLOCK - BLOCK


def test_concurrent_chunked_prefill_batch_generates_as_each_alone(cold_outputs: dict[str, list[int]]) -> None:
    engine = make_engine(max_num_batched_tokens=96)  # every prompt is prefilled over several steps
    run(engine, {"warm": PROMPTS["turn0"]})  # shared system prompt cached for the others
    results = run(engine, PROMPTS)
    assert {rid: tokens for rid, (tokens, _) in results.items()} == cold_outputs
    assert results["turn3"][1] > 0


def test_a_prompt_hitting_blocks_computed_in_the_same_step_generates_as_cold(
    cold_outputs: dict[str, list[int]],
) -> None:
    # A cold engine, both prompts in one step: turn3 is scheduled first, and its chunk's blocks are
    # cached when scheduled, so turn2 (which shares its leading blocks) hits them in the same step:
    # it reads KV the step writes before any attention runs.
    engine = make_engine()
    results = run(engine, {"turn3": PROMPTS["turn3"], "turn2": PROMPTS["turn2"]})
    assert engine.num_steps > 0 and results["turn3"][1] == 0 and results["turn2"][1] >= BLOCK
    assert {rid: tokens for rid, (tokens, _) in results.items()} == {
        rid: cold_outputs[rid] for rid in ("turn3", "turn2")
    }


def test_preemption_by_recompute_generates_as_cold(cold_outputs: dict[str, list[int]]) -> None:
    # 30 blocks: the two first prompts (13 + 16 blocks) are admitted together, then their decodes
    # run out of blocks and the scheduler preempts one and recomputes it later.
    engine = make_engine(num_blocks=30)
    results = run(engine, PROMPTS)
    assert engine.scheduler.num_preemptions > 0
    assert {rid: tokens for rid, (tokens, _) in results.items()} == cold_outputs


def test_checkpoint_model_through_the_engine_generates_the_same_warm_and_cold(tmp_path: Path) -> None:
    """A Qwen2-style checkpoint (q/k/v biases, its own tokenizer) behind the Engine: a later agent
    turn served from the prefix cache generates what a cold engine generates."""
    write_checkpoint(tmp_path / "qwen", QWEN2, seed=4)

    def engine() -> Engine:
        runner = make_runner(64, BLOCK, str(tmp_path / "qwen"))
        return Engine(EngineConfig(num_blocks=64, block_size=BLOCK), runner)

    tokenizer = engine().runner.tokenizer
    first = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "hello"},
    ]
    second = [*first, {"role": "assistant", "content": "world"}, {"role": "user", "content": "hello world"}]
    turn1, turn2 = (encode_chat(m, tokenizer) for m in (first, second))
    warm = engine()
    run(warm, {"t1": turn1})
    warm_out, cached = run(warm, {"t2": turn2})["t2"]
    cold_out, _ = run(engine(), {"t2": turn2})["t2"]
    assert cached == len(turn1) // BLOCK * BLOCK
    assert warm_out == cold_out


def test_a_prompt_onboarded_from_the_host_generates_the_same(cold_outputs: dict[str, list[int]]) -> None:
    """Turn 2's blocks are offloaded to the host tier (a session waiting on a tool), then turn 3
    onboards them instead of recomputing: the same greedy output, cached tokens reported by tier."""
    runner = make_runner(256, BLOCK, seed=3, host_blocks=64)
    engine = Engine(EngineConfig(num_blocks=256, block_size=BLOCK, host_blocks=64), runner)
    run(engine, {"t2": PROMPTS["turn2"]})
    seq_hashes = [b.block_hash for b in engine.cached_blocks()]
    assert engine.offload(seq_hashes) == len(seq_hashes)
    assert all(b.tier == "host" for b in engine.cached_blocks())
    sampling = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    engine.add_request(EngineRequest("t3", PROMPTS["turn3"], sampling))
    out: list[int] = []
    host_cached = 0
    while engine.has_work():
        for o in engine.step().outputs:
            out.extend(o.new_token_ids)
            host_cached = o.num_host_cached_tokens
    assert out == cold_outputs["turn3"]
    assert host_cached >= BLOCK * 2


def _generate(engine: Engine, rid: str, tokens: list[int], sampling: SamplingParams) -> list[int]:
    engine.add_request(EngineRequest(rid, tokens, sampling))
    out: list[int] = []
    while engine.has_work():
        for o in engine.step().outputs:
            if o.request_id == rid:
                out.extend(o.new_token_ids)
    return out


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_an_answer_continued_after_its_first_token_is_the_whole_answer(temperature: float) -> None:
    """A turn split by the gateway (gateway/split_turn.py): its first token alone, then a request whose
    prompt is the prompt and that token, `output_offset` 1, from the prefix cache; greedily or sampled
    with a seed (by position in the answer), the tokens are the one request's."""
    engine = make_engine()
    prompt = chat(2, seed=5)
    sampling = SamplingParams(max_tokens=12, temperature=temperature, seed=7, ignore_eos=True)
    whole = _generate(engine, "whole", prompt, sampling)
    first = _generate(engine, "first", prompt, msgspec.structs.replace(sampling, max_tokens=1))
    rest_sampling = msgspec.structs.replace(sampling, max_tokens=11, output_offset=1)
    rest = _generate(engine, "rest", prompt + first, rest_sampling)
    assert first + rest == whole and len(whole) == 12
