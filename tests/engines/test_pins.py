"""Session pins alone: counts per hash, the cap, expiry, and the free blocks they move between orders."""

from __future__ import annotations

from collections import OrderedDict

from engines.pins import SessionPins


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_pins(
    free: list[int], max_pinned: int = 8
) -> tuple[SessionPins, OrderedDict[int, int], OrderedDict[int, int], Clock]:
    """Pins over free cached blocks `free` (hash h in block h), evictable in that order."""
    evictable: OrderedDict[int, int] = OrderedDict((h, h) for h in free)
    pinned_free: OrderedDict[int, int] = OrderedDict()
    clock = Clock()
    return SessionPins(max_pinned, clock, evictable, pinned_free), evictable, pinned_free, clock


def test_a_pin_moves_its_free_blocks_to_the_pinned_order_tail_first_and_back() -> None:
    pins, evictable, pinned_free, _ = make_pins([1, 2, 3, 4])
    assert pins.pin("s", [1, 2, 5], ttl_s=10) == 3  # 5 is not free (in use, say): counted all the same
    assert list(evictable) == [3, 4] and list(pinned_free) == [2, 1]
    assert pins.counts == {1: 1, 2: 1, 5: 1} and pins.num_pinned == 3 and 5 in pins
    pins.unpin("s")
    assert list(evictable) == [3, 4, 2, 1] and not pinned_free and not pins.counts and pins.num_pinned == 0


def test_a_shared_block_leaves_the_pinned_order_with_its_last_pin() -> None:
    pins, evictable, pinned_free, _ = make_pins([1, 2, 3])
    pins.pin("a", [1, 2], ttl_s=10)
    pins.pin("b", [1, 3], ttl_s=10)
    assert pins.counts == {1: 2, 2: 1, 3: 1}
    pins.unpin("a")
    assert list(pinned_free) == [1, 3] and list(evictable) == [2]
    assert pins.sessions() == {"b": [1, 3]}


def test_pins_keep_the_prefix_within_the_cap_and_a_zero_ttl_unpins() -> None:
    pins, _, _, _ = make_pins([], max_pinned=3)
    assert pins.pin("a", [1, 2], ttl_s=10) == 2
    assert pins.pin("b", [7, 8, 9], ttl_s=10) == 1
    assert pins.sessions() == {"a": [1, 2], "b": [7]}
    assert pins.pin("a", [1, 2], ttl_s=0) == 0
    assert pins.sessions() == {"b": [7]} and pins.num_pinned == 1


def test_pins_expire_at_their_deadline_only() -> None:
    pins, evictable, _, clock = make_pins([1, 2])
    pins.pin("early", [1], ttl_s=5)
    pins.pin("late", [2], ttl_s=20)
    pins.expire(4.9)
    assert set(pins.sessions()) == {"early", "late"}
    pins.expire(5.0)
    assert set(pins.sessions()) == {"late"} and list(evictable) == [1]
    clock.now = 20.0
    pins.pin("other", [3], ttl_s=1)  # a pin expires the due ones first
    assert set(pins.sessions()) == {"other"}


def test_a_grown_chain_repins_as_one_pin_with_the_new_deadline() -> None:
    pins, _, pinned_free, clock = make_pins([1, 2, 3, 4])
    pins.pin("s", [1, 2], ttl_s=5)
    clock.now = 4.0
    assert pins.pin("s", [1, 2, 3, 4], ttl_s=5) == 4
    assert pins.sessions() == {"s": [1, 2, 3, 4]} and pins.num_pinned == 4
    assert list(pinned_free) == [4, 3, 2, 1]  # tail first, as if the whole chain were pinned now
    pins.expire(8.9)
    assert pins.num_pinned == 4
    pins.expire(9.0)
    assert pins.num_pinned == 0 and not pins.counts
