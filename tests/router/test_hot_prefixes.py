"""HotPrefixes: the blocks the copies of the prefixes one-shot traffic comes back to take in the pool."""

from __future__ import annotations

import math

import pytest

from router.policies import hot_prefixes
from router.policies.hot_prefixes import HotPrefixes


def test_copies_count_each_prefix_once_at_its_latest_holders() -> None:
    hot = HotPrefixes(live_s=10.0)
    hot.note(1, blocks=128, holders=1, now=0.0)
    hot.note(2, blocks=64, holders=2, now=1.0)
    assert (hot.copies, len(hot)) == (128 + 128, 2)
    hot.note(1, blocks=128, holders=3, now=2.0)  # copied twice since: its latest count stands
    assert hot.copies == 3 * 128 + 2 * 64


def test_a_prefix_not_seen_within_live_s_leaves() -> None:
    hot = HotPrefixes(live_s=10.0)
    hot.note(1, blocks=128, holders=2, now=0.0)
    hot.note(2, blocks=64, holders=1, now=5.0)
    hot.note(1, blocks=128, holders=2, now=8.0)  # seen again: lives on
    hot.expire(16.0)
    assert (hot.copies, len(hot)) == (256, 1)
    hot.expire(18.5)
    assert (hot.copies, len(hot)) == (0, 0)


def test_the_oldest_prefix_leaves_beyond_the_bound(monkeypatch) -> None:
    monkeypatch.setattr(hot_prefixes, "MAX_HOT", 2)
    hot = HotPrefixes(live_s=100.0)
    for key in range(3):
        hot.note(key, blocks=10, holders=1, now=float(key))
    assert (hot.copies, len(hot)) == (20, 2)


def test_requests_decay_over_live_s_and_blocks_count_each_prefix_once() -> None:
    hot = HotPrefixes(live_s=10.0)
    for t in range(5):
        hot.note(1, blocks=128, holders=2, now=float(t))
    hot.note(2, blocks=64, holders=1, now=4.0)
    # each request weighed exp(-age / live_s): 1 + e^-0.1 + ... + e^-0.4 at t = 4
    assert hot.requests(1, 4.0) == pytest.approx(sum(math.exp(-t / 10.0) for t in range(5)))
    assert hot.requests(1, 14.0) == pytest.approx(hot.requests(1, 4.0) * math.exp(-1.0))
    assert (hot.requests(2, 4.0), hot.requests(3, 4.0)) == (1.0, 0.0)
    assert (hot.blocks, hot.copies) == (128 + 64, 2 * 128 + 64)
    hot.expire(14.5)  # prefix 2 last seen at 4.0 leaves; prefix 1 too (last seen at 4.0)
    assert (hot.blocks, hot.copies, hot.requests(1, 14.5)) == (0, 0, 0.0)
