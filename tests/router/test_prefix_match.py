"""Matched prefixes from per-block worker masks."""

from __future__ import annotations

import random

import pytest

from router.prefix_match import bisect_prefixes, common_prefix, walk_prefixes


@pytest.mark.parametrize(
    ("a", "b", "n"), [([1, 2, 3], [1, 2, 3, 4], 3), ([1, 2, 3], [1, 5, 6], 1), ([], [1], 0)]
)
def test_common_prefix(a: list[int], b: list[int], n: int) -> None:
    assert common_prefix(a, b) == n == common_prefix(b, a)


def test_hinted_bisection_matches_the_walk() -> None:
    """Hints only change which blocks are probed: on prefix-closed held sets, any hints (right, off by
    one, out of range) give the walk's groups, in the same order (by length)."""
    rng = random.Random(7)
    for _ in range(2000):
        n = rng.randrange(1, 80)
        chain = list(range(1000, 1000 + n))
        lengths = {1 << w: rng.choice([0, n, rng.randrange(n + 1)]) for w in range(rng.randrange(1, 9))}
        held = {h: sum(bit for bit, k in lengths.items() if i < k) for i, h in enumerate(chain)}
        get = held.get
        hints = [rng.choice([*lengths.values(), rng.randrange(-2, n + 3)]) for _ in range(rng.randrange(6))]
        walked: list[tuple[int, int]] = []
        walk_prefixes(get, chain, -1, walked)
        hinted: list[tuple[int, int]] = []
        bisect_prefixes(get, chain, -1, hinted, hints)
        plain: list[tuple[int, int]] = []
        bisect_prefixes(get, chain, -1, plain)
        assert hinted == plain == sorted(walked, key=lambda g: g[1]), (lengths, hints)


def test_hints_at_the_boundaries_save_the_bisection() -> None:
    """A session's next turn where its boundaries did not move: two lookups per boundary, not ~log n."""
    chain = list(range(2048))
    held = {h: (0b11 if h < 128 else 0) | (0b10 if h < 1984 else 0) for h in chain}
    probed: list[int] = []

    def get(h: int, default: int) -> int:
        probed.append(h)
        return held.get(h, default)

    groups: list[tuple[int, int]] = []
    bisect_prefixes(get, chain, -1, groups)
    plain = len(probed)
    probed.clear()
    hinted: list[tuple[int, int]] = []
    bisect_prefixes(get, chain, -1, hinted, (128, 1984))
    assert hinted == groups == [(0b01, 128), (0b10, 1984)]
    assert len(probed) == 5 < plain  # chain[0], then both sides of each boundary
