import struct

import pytest
import xxhash
from hypothesis import given
from hypothesis import strategies as st

from router.hashing import BASE_SEED, PrefixHasher, block_hashes, hash_seed


def reference_chain(tokens: list[int], block_size: int, seed: int) -> list[int]:
    """docs/ARCHITECTURE.md's contract written out longhand, straight on xxhash."""
    out: list[int] = []
    for i in range(len(tokens) // block_size):
        block = struct.pack(f"<{block_size}I", *tokens[i * block_size : (i + 1) * block_size])
        data = block if i == 0 else struct.pack("<Q", out[-1]) + block
        out.append(xxhash.xxh3_64_intdigest(data, seed=seed))
    return out


def test_first_blocks_pinned_to_xxhash() -> None:
    tokens = list(range(40))
    first = xxhash.xxh3_64_intdigest(struct.pack("<16I", *range(16)), seed=1337)
    second = xxhash.xxh3_64_intdigest(
        struct.pack("<Q", first) + struct.pack("<16I", *range(16, 32)), seed=1337
    )
    assert block_hashes(tokens) == [first, second]  # the 8-token tail is not hashed


def test_only_full_blocks() -> None:
    assert block_hashes(list(range(15))) == []
    assert len(block_hashes(list(range(16)))) == 1


@given(
    tokens=st.lists(st.integers(0, 2**32 - 1), max_size=200),
    block_size=st.sampled_from([1, 4, 16]),
)
def test_matches_reference(tokens: list[int], block_size: int) -> None:
    assert block_hashes(tokens, block_size) == reference_chain(tokens, block_size, BASE_SEED)


@given(
    tokens=st.lists(st.integers(0, 50_000), max_size=300),
    cuts=st.lists(st.integers(0, 300), max_size=6),
)
def test_incremental_equals_whole(tokens: list[int], cuts: list[int]) -> None:
    hasher = PrefixHasher(block_size=16)
    start = 0
    for cut in [*sorted(c for c in cuts if c <= len(tokens)), len(tokens)]:
        hasher.extend(tokens[start:cut])
        start = cut
    assert hasher.hashes == block_hashes(tokens, 16)
    assert hasher.num_tokens == len(tokens)


def test_truncate_then_extend() -> None:
    tokens = list(range(100))
    hasher = PrefixHasher(block_size=16)
    hasher.extend(tokens)
    hasher.truncate(40, tokens)
    hasher.extend([7] * 30)
    assert hasher.hashes == block_hashes(tokens[:40] + [7] * 30, 16)


def test_seed_separates_tenants_and_adapters() -> None:
    assert hash_seed() == BASE_SEED
    seeds = {hash_seed(), hash_seed("lora-a"), hash_seed(None, "tenant-1"), hash_seed("lora-a", "t")}
    assert len(seeds) == 4
    tokens = list(range(16))
    assert block_hashes(tokens, seed=hash_seed(None, "t1")) != block_hashes(tokens)
    assert block_hashes(tokens, seed=hash_seed(None, "t1")) == reference_chain(
        tokens, 16, hash_seed(None, "t1")
    )


@pytest.mark.parametrize("bad", [[-1], [2**32]])
def test_rejects_out_of_range_tokens(bad: list[int]) -> None:
    with pytest.raises(OverflowError):
        block_hashes(bad * 16)
