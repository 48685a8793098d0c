"""TorchRunner at the runner level, with hand-built block tables: prefix-cache hits compute the same
logits and greedy tokens as computing from scratch, alone and batched."""

from __future__ import annotations

import random
from typing import Any

import pytest

torch = pytest.importorskip("torch")  # the whole module needs it: skipped without


from engines.runner import SamplingParams, ScheduledChunk
from engines.torch import TorchRunner
from engines.torch.runner import decode_groups
from router.chat import ByteTokenizer, encode_chat
from router.protocol import MAX_BLOCK_MS
from tests.engines.conftest import torch_device

BLOCK = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=64)


class BlockPool:
    """Hands out distinct physical blocks in a shuffled order, so block tables are not contiguous."""

    def __init__(self, num_blocks: int, seed: int = 0) -> None:
        self._free = list(range(num_blocks))
        random.Random(seed).shuffle(self._free)

    def take(self, count: int) -> list[int]:
        taken, self._free = self._free[:count], self._free[count:]
        assert len(taken) == count, "test pool exhausted"
        return taken


def chunk(
    seq: str, tokens: list[int], start: int, table: list[int], sample: bool = True, output_len: int = 0
) -> ScheduledChunk:
    return ScheduledChunk(seq, tokens, start, table, sample, GREEDY, output_len)


def make_runner(
    num_blocks: int, block_size: int, model_path: str | None = None, **kwargs: Any
) -> TorchRunner:
    """A runner on the test device, in float32 unless `dtype` says otherwise, on CUDA too (whose
    default is bf16): the tests compare cached with uncached and batched with lone computations token
    for token, and bf16 rounds differently along those paths."""
    kwargs.setdefault("dtype", torch.float32)
    return TorchRunner(num_blocks, block_size, model_path, torch_device(), **kwargs)


def blocks_for(length: int, block_size: int = BLOCK) -> int:
    return -(-length // block_size)


@pytest.fixture(scope="module")
def runner() -> TorchRunner:
    return make_runner(1024, BLOCK, seed=7)


def prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(length)]


def greedy_generate(
    runner: TorchRunner,
    prompts: list[list[int]],
    steps: int,
    pool: BlockPool,
    cached_blocks: list[int] | None = None,
) -> list[list[int]]:
    """Greedy continuation of every prompt: one batched prefill step, then batched decode steps.

    With `cached_blocks[i] = k`, prompt i's first k full blocks are computed by a separate earlier
    sequence ("donor", in its own step), and prompt i's own prefill reuses the donor's blocks and
    computes only the rest, as a prefix-cache hit does.
    """
    block = runner.block_size
    tables = [pool.take(blocks_for(len(p) + steps, block)) for p in prompts]
    starts = [0] * len(prompts)
    if cached_blocks:
        donors = []
        for i, hit in enumerate(cached_blocks):
            if hit:
                donor_table = pool.take(hit)
                donors.append(chunk(f"donor{i}", prompts[i][: hit * block], 0, donor_table, sample=False))
                tables[i][:hit] = donor_table
                starts[i] = hit * block
        assert runner.execute(donors) == [None] * len(donors)
    first = runner.execute(
        [chunk(f"s{i}", p[starts[i] :], starts[i], tables[i]) for i, p in enumerate(prompts)]
    )
    outputs = [[t] for t in first]
    for step in range(1, steps):
        decode = [
            chunk(f"s{i}", [out[-1]], len(p) + step - 1, tables[i], output_len=step)
            for i, (p, out) in enumerate(zip(prompts, outputs, strict=True))
        ]
        for out, token in zip(outputs, runner.execute(decode), strict=True):
            out.append(token)
    return outputs


def test_defaults_describe_the_tiny_model(runner: TorchRunner) -> None:
    assert runner.model_name == "kvgate-tiny"
    assert isinstance(runner.tokenizer, ByteTokenizer)
    assert runner.config.vocab_size == ByteTokenizer().vocab_size
    assert (runner.block_size, runner.num_blocks) == (BLOCK, 1024)
    assert runner.models_step_time is False and runner.step_time_s([], 0.0) is None  # real time counts
    assert runner.kv_cache.shape == (runner.config.num_layers, 2, 1024, BLOCK, 2, 32)


def test_same_seed_same_model_other_seed_differs() -> None:
    a = make_runner(8, BLOCK, seed=1)
    b = make_runner(8, BLOCK, seed=1)
    c = make_runner(8, BLOCK, seed=2)
    tokens = prompt(20, 0)
    la, lb, lc = (r.logits([chunk("x", tokens, 0, [0, 1])])[0] for r in (a, b, c))
    assert torch.equal(la, lb)
    assert not torch.allclose(la, lc)


@pytest.mark.parametrize("hit_blocks", [1, 5, 8])
def test_logits_through_prefix_cache_hit_equal_scratch(runner: TorchRunner, hit_blocks: int) -> None:
    pool = BlockPool(runner.num_blocks, seed=hit_blocks)
    tokens = prompt(8 * BLOCK + 11, seed=hit_blocks)
    scratch = runner.logits([chunk("scratch", tokens, 0, pool.take(blocks_for(len(tokens))))])[0]

    donor_table = pool.take(hit_blocks)
    runner.execute([chunk("donor", tokens[: hit_blocks * BLOCK], 0, donor_table, sample=False)])
    table = donor_table + pool.take(blocks_for(len(tokens)) - hit_blocks)
    start = hit_blocks * BLOCK
    suffix = runner.logits([chunk("hit", tokens[start:], start, table)])[0]

    assert suffix.shape == (len(tokens) - start, runner.config.vocab_size)
    torch.testing.assert_close(suffix, scratch[start:], rtol=1e-4, atol=1e-4)


def test_chunked_prefill_at_unaligned_positions_equals_one_shot(runner: TorchRunner) -> None:
    pool = BlockPool(runner.num_blocks, seed=11)
    tokens = prompt(100, seed=3)
    scratch = runner.logits([chunk("one", tokens, 0, pool.take(blocks_for(100)))])[0]
    table = pool.take(blocks_for(100))
    pieces = [(0, 37), (37, 38), (38, 70), (70, 100)]  # includes a one-token chunk mid-prompt
    got = [runner.logits([chunk("parts", tokens[a:b], a, table)])[0] for a, b in pieces]
    torch.testing.assert_close(torch.cat(got), scratch, rtol=1e-4, atol=1e-4)


def test_mixed_batch_equals_each_chunk_alone(runner: TorchRunner) -> None:
    """A step with prefills (fresh and against a cached prefix) and decodes of different lengths
    computes, for each chunk, what that chunk computes alone."""
    pool = BlockPool(runner.num_blocks, seed=5)
    lengths = [3, 40, 17, 64, 1, 90]
    prompts = [prompt(n + 8, seed=100 + n) for n in lengths]
    tables = [pool.take(blocks_for(len(p))) for p in prompts]
    # Sequences 2, 3 and 4 already hold their first tokens: 3 and 4 will decode one token, 2 prefills
    # against its prefix.
    held = {2: 16, 3: len(prompts[3]) - 1, 4: len(prompts[4]) - 1}
    runner.execute([chunk(f"p{i}", prompts[i][:n], 0, tables[i], sample=False) for i, n in held.items()])
    chunks = [chunk(f"p{i}", p[held.get(i, 0) :], held.get(i, 0), tables[i]) for i, p in enumerate(prompts)]
    batched = runner.logits(chunks)
    for c, logits in zip(chunks, batched, strict=True):
        alone = runner.logits([c])[0]  # recomputes the same K/V into the same slots
        torch.testing.assert_close(logits, alone, rtol=1e-4, atol=1e-4)


def test_greedy_output_identical_with_and_without_cache_alone(runner: TorchRunner) -> None:
    tokens = encode_chat(
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "x" * 120}],
        runner.tokenizer,
    )
    cold = greedy_generate(runner, [tokens], 40, BlockPool(runner.num_blocks, 1))
    warm = greedy_generate(
        runner, [tokens], 40, BlockPool(runner.num_blocks, 2), cached_blocks=[len(tokens) // BLOCK]
    )
    assert cold == warm
    assert len(cold[0]) == 40


def test_greedy_output_identical_with_and_without_cache_in_a_batch(runner: TorchRunner) -> None:
    prompts = [prompt(n, seed=n) for n in (5, 33, 80, 129, 16, 47)]
    hits = [0, 2, 4, 8, 0, 1]
    cold = greedy_generate(runner, prompts, 24, BlockPool(runner.num_blocks, 3))
    warm = greedy_generate(runner, prompts, 24, BlockPool(runner.num_blocks, 4), cached_blocks=hits)
    alone = [greedy_generate(runner, [p], 24, BlockPool(runner.num_blocks, 6))[0] for p in prompts]
    assert cold == warm == alone
    assert len({tuple(o) for o in cold}) > 1  # different prompts, different continuations


def test_seeded_sampling_is_reproducible_and_independent_of_batching(runner: TorchRunner) -> None:
    pool = BlockPool(runner.num_blocks, seed=8)
    tokens = prompt(30, seed=9)
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)

    def sample(seed_params: SamplingParams, output_len: int, extra: int) -> int | None:
        main = ScheduledChunk("s", tokens, 0, pool.take(2), True, seed_params, output_len)
        others = [chunk(f"o{j}", prompt(9, j), 0, pool.take(1)) for j in range(extra)]
        return runner.execute([*others, main])[-1]

    draws = [sample(params, n, 0) for n in range(12)]
    assert draws == [sample(params, n, 3) for n in range(12)]
    assert len(set(draws)) > 1  # the position changes the draw
    other = [sample(SamplingParams(temperature=1.0, top_p=0.9, seed=99), n, 0) for n in range(12)]
    assert other != draws


def test_tiny_top_p_and_zero_temperature_are_greedy(runner: TorchRunner) -> None:
    pool = BlockPool(runner.num_blocks, seed=12)
    tokens = prompt(25, seed=13)
    greedy = int(runner.logits([chunk("g", tokens, 0, pool.take(2))])[0][-1].argmax())
    for params in (
        SamplingParams(temperature=2.0, top_p=1e-6, seed=5),
        SamplingParams(temperature=1.0, top_p=0.0, seed=5),
        SamplingParams(temperature=1e-30, seed=5),  # would overflow logits / temperature
    ):
        for n in range(3):
            c = ScheduledChunk("n", tokens, 0, pool.take(2), True, params, n)
            assert runner.execute([c]) == [greedy]


def test_non_sampling_chunks_return_none(runner: TorchRunner) -> None:
    pool = BlockPool(runner.num_blocks, seed=14)
    out = runner.execute(
        [chunk("a", prompt(20, 1), 0, pool.take(2), sample=False), chunk("b", [1], 0, pool.take(1))]
    )
    assert out[0] is None and isinstance(out[1], int)
    assert 0 <= out[1] < runner.config.vocab_size
    assert runner.execute([]) == []


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (chunk("x", [1] * 20, 0, [0]), "does not cover"),
        (chunk("x", [1], 0, [5000]), "out of range"),
        (chunk("x", [1], 0, [-1]), "out of range"),
        (chunk("x", [999], 0, [0]), "token ids"),
        (chunk("x", [-3], 0, [0]), "token ids"),
        (chunk("x", [], 0, [0]), "needs tokens"),
        (chunk("x", [1], 10**9, [0]), "max_model_len"),
    ],
)
def test_bad_chunks_are_refused_with_a_clear_error(
    runner: TorchRunner, bad: ScheduledChunk, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        runner.execute([bad])


def test_bfloat16_keeps_rope_frequencies_in_float32() -> None:
    """bf16 weights and cache (the CUDA default), while RoPE angles stay exact at long positions."""
    runner = make_runner(16, BLOCK, seed=7, dtype=torch.bfloat16)
    assert runner.kv_cache.dtype == torch.bfloat16
    assert runner.model.model.rotary.inv_freq.dtype == torch.float32
    reference = make_runner(16, BLOCK, seed=7)
    tokens = prompt(40, seed=2)
    low, full = (r.logits([chunk("b", tokens, 0, [0, 1, 2])])[0] for r in (runner, reference))
    assert low.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(low, full, dim=-1).min() > 0.99


def test_decode_groups_bound_padding_and_gather() -> None:
    needed = [1, 40, 3, 20, 2, 39, 11, 21]  # blocks of context of eight one-token chunks
    groups = decode_groups(list(range(8)), needed, max_gather_blocks=100)
    assert sorted(i for g in groups for i in g) == list(range(8))
    for group in groups:
        widest = max(needed[i] for i in group)
        assert all(2 * needed[i] >= widest for i in group)  # padding at most doubles the keys
        assert len(group) == 1 or len(group) * widest <= 100
    assert groups[0] == [1, 5]  # longest first; 40 + 39 fit, a third 40-wide row would not
    assert decode_groups([0, 1], [5, 5], max_gather_blocks=1) == [[0], [1]]


def test_decode_batch_of_very_different_lengths_equals_each_alone(runner: TorchRunner) -> None:
    pool = BlockPool(runner.num_blocks, seed=21)
    prompts = [prompt(n, seed=n) for n in (2, 700, 15, 300, 40)]
    tables = [pool.take(blocks_for(len(p))) for p in prompts]
    runner.execute([chunk(f"d{i}", p[:-1], 0, tables[i], sample=False) for i, p in enumerate(prompts)])
    chunks = [chunk(f"d{i}", p[-1:], len(p) - 1, tables[i]) for i, p in enumerate(prompts)]
    for c, logits in zip(chunks, runner.logits(chunks), strict=True):
        torch.testing.assert_close(logits, runner.logits([c])[0], rtol=1e-4, atol=1e-4)


def test_a_kv_cache_larger_than_memory_is_refused_before_allocating() -> None:
    with pytest.raises(ValueError, match="lower --num-blocks"):
        make_runner(10**9, BLOCK)


def test_fused_projections_share_the_weights_and_compute_what_separate_ones_do() -> None:
    fused = make_runner(64, BLOCK, seed=3)
    attn = fused.model.model.layers[0].self_attn
    # the q/k/v parameters are views of the one fused weight: no second copy, same state dict
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
    assert set(fused.model.state_dict()) == set(make_runner(64, BLOCK, seed=3).model.state_dict())
    tokens = prompt(3 * BLOCK + 5, seed=3)
    table = BlockPool(64, seed=3).take(blocks_for(len(tokens) + 1))
    want = fused.logits([chunk("a", tokens, 0, table)])[0]
    # `.to()` replaces every parameter: the fused weight is then stale and must not be used
    fused.model.to(torch.float64).to(torch.float32)
    got = fused.logits([chunk("a", tokens, 0, table)])[0]
    assert attn.qkv._fused is None and fused.model.model.layers[0].mlp.gate_up._fused is None
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # a parameter written in place after fusing reaches the fused GEMM
    fused.model.fuse_projections()
    with torch.no_grad():
        attn.v_proj.weight.zero_()
    assert not torch.allclose(fused.logits([chunk("a", tokens, 0, table)])[0], want)


def test_logits_after_an_onboard_from_the_host_equal_scratch() -> None:
    """The donor's blocks go to the host buffer, their device blocks are overwritten, and they come
    back in other device blocks: the suffix's logits equal a computation from scratch."""
    runner = make_runner(64, BLOCK, seed=0, host_blocks=8)
    pool = BlockPool(runner.num_blocks, seed=7)
    tokens = prompt(6 * BLOCK + 5, seed=7)
    scratch = runner.logits([chunk("scratch", tokens, 0, pool.take(blocks_for(len(tokens))))])[0]
    donor = pool.take(4)
    runner.execute([chunk("donor", tokens[: 4 * BLOCK], 0, donor, sample=False)])
    runner.copy_blocks(list(zip(donor, [5, 1, 6, 0], strict=True)), [])
    runner.execute([chunk("noise", prompt(4 * BLOCK, seed=99), 0, donor, sample=False)])  # overwrite
    table = pool.take(4)
    runner.copy_blocks([], list(zip([5, 1, 6, 0], table, strict=True)))
    table += pool.take(blocks_for(len(tokens)) - 4)
    suffix = runner.logits([chunk("onboarded", tokens[4 * BLOCK :], 4 * BLOCK, table)])[0]
    torch.testing.assert_close(suffix, scratch[4 * BLOCK :], rtol=1e-4, atol=1e-4)


def test_a_host_tier_announces_its_link_time_measured_at_startup() -> None:
    """With a host tier the runner measures one block's onboarding once (positive, within what a load
    report carries), between buffers still empty, so no KV changes; without one it announces none."""
    assert make_runner(16, BLOCK).host_block_ms == 0.0
    runner = make_runner(16, BLOCK, host_blocks=8)
    assert 0 < runner.host_block_ms <= MAX_BLOCK_MS
    assert runner.host_cache is not None
    assert not runner.kv_cache.any() and not runner.host_cache.any()
