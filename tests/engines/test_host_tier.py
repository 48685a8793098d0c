"""The host tier's state alone: slots, drop order, keeps and their expiry, claimed slots."""

from __future__ import annotations

import pytest

from engines.host_tier import HostTier


def test_blocks_are_dropped_least_recently_offloaded_first_and_kept_ones_last() -> None:
    tier = HostTier(4)
    for block_hash in (1, 2, 3):
        tier.store(block_hash, None)
    tier.keep("s", [1, 9], expires_at=10.0)  # 9 is not on the host yet: kept when it arrives
    tier.store(9, 1)
    assert tier.droppable_in_order() == [2, 3, 1, 9]
    assert tier.num_droppable == 2 and tier.is_kept(9) and not tier.is_kept(2)
    assert [tier.drop_oldest() for _ in range(4)] == [2, 3, 1, 9]
    assert tier.num_free == 4 and len(tier) == 0


def test_every_block_has_its_own_slot_and_a_dropped_slot_is_reused() -> None:
    tier = HostTier(2)
    slots = {tier.store(1, None), tier.store(2, 1)}
    assert slots == {0, 1} and tier.num_free == 0
    freed = tier.slot_of(1)
    tier.drop(1)
    assert 1 not in tier and tier.slot_of(1) == -1
    assert tier.store(3, None) == freed


def test_a_claimed_slot_stays_taken_until_released() -> None:
    tier = HostTier(2)
    slot = tier.store(1, None)
    assert tier.claim(1) == slot
    assert 1 not in tier and tier.num_claimed == 1 and tier.num_free == 1
    tier.release_claimed()
    assert tier.num_claimed == 0 and tier.num_free == 2


def test_keeps_end_when_unkept_replaced_or_expired() -> None:
    tier = HostTier(4)
    tier.store(1, None)
    tier.store(2, 1)
    tier.keep("a", [1], expires_at=5.0)
    tier.keep("b", [1, 2], expires_at=20.0)
    tier.keep("b", [2], expires_at=20.0)  # replaces b's keep: 1 is kept by a alone
    assert tier.kept_sessions() == {"a": [1], "b": [2]}
    tier.expire(4.9)
    assert tier.is_kept(1)
    tier.expire(5.0)
    assert not tier.is_kept(1) and tier.kept_sessions() == {"b": [2]}
    tier.unkeep("b")
    assert not tier.is_kept(2) and tier.droppable_in_order() == [1, 2]


def test_a_flood_of_keeps_stays_under_its_cap_and_the_newest_stay() -> None:
    tier = HostTier(8)  # 4 x 8 = 32 hashes kept at most, all keeps together
    assert tier.max_kept_hashes == 32
    for n in range(10_000):  # distinct sessions, each keeping 5 blocks (some shared with the last)
        tier.keep(f"s{n}", [n, n + 1, n + 2, 7_000_000 + n, 9_000_000 + n], expires_at=1e9)
        assert sum(map(len, tier.kept_sessions().values())) <= 32
    kept = tier.kept_sessions()
    assert list(kept) == [f"s{n}" for n in range(10_000 - 6, 10_000)]  # the 6 newest, whole
    assert kept["s9999"] == [9999, 10_000, 10_001, 7_009_999, 9_009_999]
    tier.keep("long", list(range(100)), expires_at=1e9)  # alone over the cap: its first blocks
    assert tier.kept_sessions() == {"long": list(range(32))}
    tier.store(31, None)
    tier.store(32, None)
    assert tier.is_kept(31) and not tier.is_kept(32)
    tier.unkeep("long")
    assert tier.kept_sessions() == {} and not tier.is_kept(31)


def test_clear_drops_everything_and_frees_every_slot() -> None:
    tier = HostTier(3)
    tier.store(1, None)
    tier.store(2, 1)
    tier.keep("s", [2], expires_at=1.0)
    assert sorted(tier.clear()) == [1, 2]
    assert tier.num_free == 3 and len(tier) == 0 and tier.droppable_in_order() == []


def test_a_host_tier_needs_a_block() -> None:
    with pytest.raises(ValueError, match="at least one block"):
        HostTier(0)
