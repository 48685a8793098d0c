"""Host transfers alone: which evicted blocks the host takes, the copies to run, the host's events."""

from __future__ import annotations

from engines.host_transfers import HostTransfers
from router.protocol import BlockRemoved, BlockStored, KvEvent

# device blocks 0..3 hold the chain 10 <- 11 <- 12 <- 13 (hash 10 in block 0, and so on); the block
# manager hands its victims over while they are still cached on the device
PARENT_OF: list[int | None] = [None, 10, 11, 12]
CHAIN = [(10, 0), (11, 1), (12, 2), (13, 3)]
ON_DEVICE = {10, 11, 12, 13}


def test_an_evicted_chain_is_stored_head_first_with_its_copies() -> None:
    transfers = HostTransfers(8)
    events: list[KvEvent] = []
    transfers.store_evicted(CHAIN[::-1], PARENT_OF, ON_DEVICE, events)  # eviction goes tail first
    assert events == [BlockStored([10, 11, 12, 13], None, "host")]
    assert [block_id for block_id, _ in transfers.offloads] == [3, 2, 1, 0]
    copies = transfers.take_copies()
    assert copies and len(copies.offloads) == 4 and not copies.onboards
    assert not transfers.take_copies()


def test_a_block_no_prefix_match_can_reach_is_not_stored() -> None:
    transfers = HostTransfers(8)
    events: list[KvEvent] = []
    transfers.store_evicted([(12, 2)], PARENT_OF, set(), events)  # its parent 11 is on neither tier
    assert events == [] and len(transfers.tier) == 0


def test_a_small_host_keeps_the_chain_head_and_drops_its_oldest_for_room() -> None:
    transfers = HostTransfers(2)
    events: list[KvEvent] = []
    transfers.store_evicted(CHAIN[::-1], PARENT_OF, ON_DEVICE, events)
    assert sorted(transfers.tier.parent_of) == [10, 11]
    events.clear()
    # a new chain's head pushes out the least recently offloaded block: 11, stored before its parent
    transfers.store_evicted([(20, 0)], [None], set(), events)
    assert events == [BlockRemoved([11], "host"), BlockStored([20], None, "host")]


def test_a_claimed_slot_stays_taken_until_the_copies_ran() -> None:
    transfers = HostTransfers(2)
    transfers.store_evicted(CHAIN[:1], PARENT_OF, set(), [])
    transfers.take_copies()
    assert transfers.match([10, 11]) == 1
    slot = transfers.tier.slot_of(10)
    assert transfers.claim([10]) == [slot] and 10 not in transfers.tier
    transfers.onboarded([slot], [3])
    assert transfers.tier.num_free == 1 and transfers.has_removed
    events: list[KvEvent] = []
    transfers.flush_removed(events)
    assert events == [BlockRemoved([10], "host")] and not transfers.has_removed
    assert transfers.take_copies().onboards == [(slot, 3)]
    assert transfers.tier.num_free == 2


def test_a_recomputed_block_leaves_the_host() -> None:
    transfers = HostTransfers(2)
    transfers.store_evicted(CHAIN[:1], PARENT_OF, set(), [])
    transfers.drop_recomputed(10)
    transfers.drop_recomputed(99)  # not on the host: nothing to drop
    events: list[KvEvent] = []
    transfers.flush_removed(events)
    assert events == [BlockRemoved([10], "host")] and len(transfers.tier) == 0
