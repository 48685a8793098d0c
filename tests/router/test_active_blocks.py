"""The blocks in flight on one worker as Dynamo counts them (router/policies/active_blocks.py)."""

from __future__ import annotations

import random

from router.policies.active_blocks import ActiveBlocks


def chain(n: int, base: int = 1000) -> list[int]:
    return list(range(base, base + n))


def test_a_chains_blocks_in_flight_are_counted_by_bisection() -> None:
    # chained hashes: the blocks of other chains that a chain holds are a prefix of it, so bisection
    # counts what the scan over every block counts
    rng = random.Random(5)
    trunk = chain(200)
    for _ in range(200):
        active = ActiveBlocks()
        for i in range(rng.randrange(0, 5)):
            active.add(trunk[: rng.randrange(0, 201)] + chain(rng.randrange(0, 20), base=10_000 * (i + 1)))
        prompt = trunk[: rng.randrange(0, 201)] + chain(rng.randrange(0, 20), base=999_000)
        assert active.potential_blocks_of_prefix(prompt) == active.potential_blocks(prompt)


def test_a_block_leaves_with_the_last_request_holding_it() -> None:
    active = ActiveBlocks()
    active.add(chain(10))
    active.add(chain(4))
    active.remove(chain(10))
    assert len(active) == 4
    active.remove(chain(4))
    assert len(active) == 0
