"""A chain's matched prefix per worker, from the worker bitmask of each of its blocks.

A block index keeps, per block hash, the bitmask of the workers holding it. A worker's matched prefix
of a chain stops at its first miss, as the engines' lookups do. A linear walk over a 2,048 block chain
costs ~100 µs in Python, so where a worker's held set is prefix-closed along the chain (it holds a block
only if it holds the block's parent, which the chained hash fixes), its bit along the chain reads
1…1 0…0, and `bisect_prefixes` finds every worker's boundary at once, one lookup per bisection step.
`walk_prefixes` is the exact answer for any held sets. Both yield (worker mask, length) groups, which
`expand` and `MaskNames` spell out per worker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import repeat

# `get(block_hash, 0)`: the mask of the workers holding a block (a mask dict's `get`)
MaskLookup = Callable[[int, int], int]


def expand(groups: list[tuple[int, int]], names: dict[int, str] | None = None) -> dict:
    """{worker (or bit when `names` is None): length} from (worker mask, length) groups."""
    out = {}
    for m, n in groups:
        while m:
            low = m & -m
            out[names[low] if names is not None else low] = n
            m ^= low
    return out


class MaskNames:
    """Worker ids of a bitmask, memoised: the same few masks (who holds the system prompt, who holds
    a session) come back on every pick, and spelling out 64 bits each time costs more than the lookup."""

    __slots__ = ("_cache", "_names")

    def __init__(self, names: dict[int, str]) -> None:
        self._names = names  # bit -> worker id, shared with the owner and kept current by it
        self._cache: dict[int, tuple[str, ...]] = {}

    def invalidate(self) -> None:
        self._cache.clear()

    def expand(self, groups: list[tuple[int, int]]) -> dict[str, int]:
        out: dict[str, int] = {}
        cache = self._cache
        for m, n in groups:
            ids = cache.get(m)
            if ids is None:
                if len(cache) >= 4096:
                    cache.clear()
                ids = cache[m] = tuple(expand([(m, 0)], self._names))
            out.update(zip(ids, repeat(n)))
        return out


def bisect_prefixes(
    get: MaskLookup, chain: Sequence[int], mask: int, groups: list[tuple[int, int]], hints: Sequence[int] = ()
) -> None:
    """Matched prefix lengths of the workers in `mask`, for held sets prefix-closed along `chain`.

    `get(hash, 0)` is the held mask of a block. Appends (workers, length) groups, lengths >= 1. Workers
    with the same boundary share their lookups: O(k log n) lookups for k distinct boundaries.

    `hints` are likely lengths (a session's previous match): each splits a range it falls in before
    the midpoint does, so a boundary that did not move costs two lookups, not log n. Any split gives
    the same answer on prefix-closed sets; a wrong hint costs one lookup, at most two per hint.
    """
    n = len(chain)
    if not n or not mask:
        return
    first = get(chain[0], 0) & mask
    if not first:
        return
    # a boundary at g: chain[g - 1] held, chain[g] not; probing index i splits [lo, hi] at i
    splits = sorted({i for g in hints for i in (g - 1, g) if 0 < i < n})
    stack = [(1, n, first)]  # every bit of m holds chain[:lo]; its boundary lies in [lo, hi]
    pop = stack.pop
    push = stack.append
    found = groups.append
    while stack:
        lo, hi, m = pop()
        if lo == hi:
            found((m, lo))
            continue
        mid = (lo + hi) >> 1
        for i in splits:
            if lo <= i < hi:
                mid = i
                break
        holds = get(chain[mid], 0) & m
        if holds:
            push((mid + 1, hi, holds))
        if holds != m:
            push((lo, mid, m ^ holds))


def walk_prefixes(get: MaskLookup, chain: Sequence[int], mask: int, groups: list[tuple[int, int]]) -> None:
    """Same answer as `bisect_prefixes` for any held sets, one lookup per block (the slow path)."""
    m = mask
    for i, h in enumerate(chain):
        holds = get(h, 0) & m
        if holds != m:
            if i:
                groups.append((m ^ holds, i))
            m = holds
            if not m:
                return
    if m:
        groups.append((m, len(chain)))


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Blocks two chains share: chained hashes agree up to the first difference, then never again."""
    lo, hi = 0, min(len(a), len(b))
    if hi and a[hi - 1] == b[hi - 1]:
        return hi
    while lo < hi:  # invariant: a[:lo] == b[:lo], and they differ somewhere before hi
        mid = (lo + hi) >> 1
        if a[mid] == b[mid]:
            lo = mid + 1
        else:
            hi = mid
    return lo
