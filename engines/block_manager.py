"""Paged KV blocks with a prefix cache keyed by `router.hashing` chain hashes.

A block is in use (ref count > 0), or free. A free block is either uncached (no hash: never filled,
or a duplicate of a block cached elsewhere) or cached: it keeps its KV and its hash until it is
reused, so a later prompt with the same prefix skips computing it. Allocation takes uncached blocks
first, then evicts cached ones least recently freed first, pinned ones last. Pins (a session's
blocks, with a TTL, engines/pins.py) are only an eviction order: they never make an allocation fail.

Every change of the cached set is appended to `events` (BlockStored, BlockRemoved, AllBlocksCleared),
in order; the engine drains them after each step. Replaying them reproduces `cached_blocks()`.

With a host tier (`host_blocks` > 0, engines/host_tier.py), an evicted block worth keeping is offloaded
there instead of dropped, and the blocks that follow a sequence's device prefix on the host are
onboarded at admission instead of recomputed: they become device blocks again at once (events on both
tiers), and the copies that make it true wait in engines/host_transfers.py for the engine to run
before the step computes anything (`take_copies`). With no host tier nothing of this runs.

The specification is tests/engines/reference_block_manager.py (one call per block, first written);
this manager gives the same block ids, events and eviction order (tested). It differs in two places
only, both measured on the simulator: a waiting sequence's prefix match is remembered between steps
(`PrefixMatch`), and a session re-pinning its grown chain moves only the blocks whose place changes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from engines.host_tier import HostTier
from engines.host_transfers import BlockCopies, HostTransfers
from engines.pins import SessionPins
from engines.sequence import Sequence
from router.protocol import AllBlocksCleared, BlockRemoved, BlockStored, CachedBlock, KvEvent


class PrefixMatch:
    """The cached prefix last found for a sequence. The scheduler asks about the same waiting
    sequence step after step; while no block has left the cache since, the blocks found then are
    still there (in the same block ids), so only the blocks past them need looking up."""

    __slots__ = ("block_ids", "cache_version", "evictions", "limit", "seq")

    def __init__(
        self, seq: Sequence, limit: int, block_ids: list[int], evictions: int, cache_version: int
    ) -> None:
        self.seq = seq
        self.limit = limit
        self.block_ids = block_ids
        self.evictions = evictions
        self.cache_version = cache_version


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        clock: Callable[[], float],
        max_pinned_blocks: int | None = None,
        host_blocks: int = 0,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        if host_blocks < 0:
            raise ValueError("host_blocks must not be negative")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.clock = clock
        # per block id: its users, its hash while cached (None: uncached) and its parent's hash
        self.ref_counts = [0] * num_blocks
        self.hash_of: list[int | None] = [None] * num_blocks
        self.parent_of: list[int | None] = [None] * num_blocks
        self.num_used = 0
        self.events: list[KvEvent] = []
        # free blocks: uncached ones (taken lowest id first, from the end), and the cached ones in two
        # eviction orders, least recently freed first, keyed by hash (pins and evictions start there)
        self._uncached: list[int] = list(range(num_blocks - 1, -1, -1))
        self._evictable: OrderedDict[int, int] = OrderedDict()  # hash -> block id
        self._pinned_free: OrderedDict[int, int] = OrderedDict()
        self._by_hash: dict[int, int] = {}  # the cached blocks: hash -> block id
        max_pinned = num_blocks // 2 if max_pinned_blocks is None else max_pinned_blocks
        self.pins = SessionPins(max_pinned, clock, self._evictable, self._pinned_free)
        self._pin_counts = self.pins.counts  # read for every block freed
        self._removed: list[int] = []  # evictions not yet turned into one BlockRemoved event
        self._cache_version = 0  # bumped by every change of the cached set
        self._evictions = 0  # bumped by every removal from it
        self._match: PrefixMatch | None = None
        self.transfers = HostTransfers(host_blocks) if host_blocks else None
        self.host: HostTier | None = self.transfers.tier if self.transfers is not None else None

    # --- state

    @property
    def num_free(self) -> int:
        return len(self._uncached) + len(self._evictable) + len(self._pinned_free)

    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def cached_blocks(self) -> list[CachedBlock]:
        blocks = [CachedBlock(h, self.parent_of[b]) for h, b in self._by_hash.items()]
        if self.host is not None:
            blocks += [CachedBlock(h, p, "host") for h, p in self.host.parent_of.items()]
        return blocks

    def is_cached(self, block_hash: int) -> bool:
        return block_hash in self._by_hash

    @property
    def num_pinned(self) -> int:
        return self.pins.num_pinned

    @property
    def max_pinned_blocks(self) -> int:
        return self.pins.max_pinned_blocks

    @property
    def has_events(self) -> bool:
        transfers = self.transfers
        return bool(self.events or self._removed or (transfers is not None and transfers.has_removed))

    def take_events(self) -> list[KvEvent]:
        self._flush_removed()
        self._flush_host_removed()
        events, self.events = self.events, []
        return events

    def take_copies(self) -> BlockCopies:
        """The copies decided since the last call; the engine runs them before the step's compute."""
        if self.transfers is None:
            return BlockCopies([], [])
        return self.transfers.take_copies()

    # --- allocation

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> int:
        """Leading full blocks of `seq` that are cached, keeping at least one token to compute."""
        limit = (len(seq) - 1) // self.block_size
        match = self._match
        evictions = self._evictions
        if match is None or match.seq is not seq or match.limit != limit or match.evictions != evictions:
            match = PrefixMatch(seq, limit, [], evictions, -1)
        elif len(match.block_ids) == limit or match.cache_version == self._cache_version:
            return len(match.block_ids)
        # the cached set is not prefix-closed (a parent can be evicted before its child): scan on from
        # the last block found to the first miss
        found = match.block_ids
        by_hash = self._by_hash
        for block_hash in seq.hashes(limit)[len(found) : limit]:
            block_id = by_hash.get(block_hash)
            if block_id is None:
                break
            found.append(block_id)
        match.cache_version = self._cache_version
        self._match = match
        return len(found)

    def match_host(self, seq: Sequence, num_hits: int) -> int:
        """Full blocks of `seq` on the host right after its first `num_hits` (its device prefix), within
        the same limit as `match_prefix`: the blocks `allocate` would onboard."""
        if self.transfers is None:
            return 0
        limit = (len(seq) - 1) // self.block_size
        return self.transfers.match(seq.hashes(limit)[num_hits:limit])

    def can_allocate(self, seq: Sequence, num_hits: int) -> bool:
        need = self.blocks_needed(len(seq)) - num_hits
        free = self.num_free
        if free - num_hits >= need:
            return True  # even if every hit were a free block
        # hit blocks nobody uses are counted as free now but will not be once allocated
        refs = self.ref_counts
        free_hits = sum(1 for block_id in self._hit_ids(seq, num_hits) if refs[block_id] == 0)
        return free - free_hits >= need

    def allocate(
        self, seq: Sequence, num_hits: int, num_onboard: int = 0, num_new_tokens: int | None = None
    ) -> None:
        """Give `seq` its cached prefix (`num_hits` blocks), then fresh blocks, the first `num_onboard`
        of them filled from the host (`match_host`), the rest for the first `num_new_tokens` tokens to
        compute after those (None: all the rest). The caller checked `can_allocate` (an onboarded
        block needs a fresh block, as a computed one does); the later chunks' blocks come from
        `append_slots`, step by step, as in vLLM."""
        table = seq.block_table
        refs = self.ref_counts
        evictable, pinned_free = self._evictable, self._pinned_free
        hit_ids = self._hit_ids(seq, num_hits)
        for block_hash, block_id in zip(seq.hashes(num_hits)[:num_hits], hit_ids, strict=True):
            if refs[block_id] == 0:  # a free cached block leaves its free order
                if evictable.pop(block_hash, None) is None:
                    del pinned_free[block_hash]
                self.num_used += 1
            refs[block_id] += 1
        table.extend(hit_ids)
        onboarded = seq.hashes(num_hits + num_onboard)[num_hits : num_hits + num_onboard]
        # claimed before any eviction below can offload to the host and make it drop them
        slots = self.transfers.claim(onboarded) if self.transfers is not None and onboarded else []
        end = len(seq)
        if num_new_tokens is not None:
            end = min(end, (num_hits + num_onboard) * self.block_size + num_new_tokens)
        fresh = self.blocks_needed(end) - num_hits
        if fresh > 0:
            table.extend(self._take_free(fresh))
        if onboarded:
            parent = seq.block_hashes[num_hits - 1] if num_hits else None
            self._onboard(table[num_hits : num_hits + len(onboarded)], onboarded, slots, parent)
        computed = num_hits + len(onboarded)
        seq.num_computed_tokens = computed * self.block_size
        seq.num_committed_blocks = computed
        if seq.num_cached_tokens < 0:
            seq.num_cached_tokens = seq.num_computed_tokens
            seq.num_host_cached_tokens = len(onboarded) * self.block_size

    def can_append(self, seq: Sequence, num_tokens: int) -> bool:
        need = self.blocks_needed(seq.num_computed_tokens + num_tokens) - len(seq.block_table)
        return need <= self.num_free

    def append_slots(self, seq: Sequence, num_tokens: int) -> None:
        """Blocks for `num_tokens` more computed tokens (decode crossing a block boundary)."""
        fresh = self.blocks_needed(seq.num_computed_tokens + num_tokens) - len(seq.block_table)
        if fresh > 0:
            seq.block_table.extend(self._take_free(fresh))

    def commit(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Offer the full blocks of `seq`'s first `num_tokens` tokens (default: those computed) to the
        prefix cache. The scheduler commits a step's chunk when it schedules it, as vLLM caches a
        block when it allocates it for the step that computes it: a sequence admitted later in the
        same step can hit it (the step writes every new token's KV before any attention reads)."""
        full = (seq.num_computed_tokens if num_tokens is None else num_tokens) // self.block_size
        start = seq.num_committed_blocks
        if full <= start:
            return
        seq.num_committed_blocks = full
        self._cache_version += 1
        hashes = seq.hashes(full)
        parent = hashes[start - 1] if start else None
        run: list[int] = []  # consecutive newly cached blocks: one BlockStored event
        run_parent = parent
        transfers = self.transfers
        for block_hash, block_id in zip(hashes[start:full], seq.block_table[start:full], strict=True):
            if transfers is not None:
                transfers.drop_recomputed(block_hash)
            if block_hash in self._by_hash:
                # the same content is cached in another block: this one stays uncached
                if run:
                    self._stored(run, run_parent)
                    run = []
            else:
                self._by_hash[block_hash] = block_id
                self.hash_of[block_id] = block_hash
                self.parent_of[block_id] = parent
                if not run:
                    run_parent = parent
                run.append(block_hash)
            parent = block_hash
        if run:
            self._stored(run, run_parent)

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks, tail first, so that a chain's tail is evicted before its head."""
        refs, hash_of, pin_counts = self.ref_counts, self.hash_of, self._pin_counts
        for block_id in reversed(seq.block_table):
            refs[block_id] -= 1
            if refs[block_id]:
                continue
            self.num_used -= 1
            block_hash = hash_of[block_id]
            if block_hash is None:
                self._uncached.append(block_id)
            elif block_hash in pin_counts:
                self._pinned_free[block_hash] = block_id
            else:
                self._evictable[block_hash] = block_id
        seq.block_table.clear()
        seq.num_committed_blocks = 0

    def reset(self) -> bool:
        """Drop every cached block; refused (False) while any block is in use."""
        if self.num_used:
            return False
        self._flush_removed()
        self._flush_host_removed()
        self._cache_version += 1
        self._evictions += 1
        if self.host is not None:
            self.host.clear()
        self._by_hash.clear()
        self._evictable.clear()
        self._pinned_free.clear()
        self.hash_of = [None] * self.num_blocks
        self._uncached = list(range(self.num_blocks - 1, -1, -1))
        self.events.append(AllBlocksCleared())
        return True

    # --- pins (engines/pins.py) and host keeps

    def pin(self, session_id: str, block_hashes: list[int], ttl_s: float) -> int:
        """Make a session's blocks the last to be evicted for `ttl_s`; returns how many were pinned
        (fewer than asked when the cap on pinned blocks is reached; the prefix is kept)."""
        self.expire_pins()
        return self.pins.pin(session_id, block_hashes, ttl_s)

    def unpin(self, session_id: str) -> None:
        self.pins.unpin(session_id)

    def keep_on_host(self, session_id: str, block_hashes: list[int], ttl_s: float) -> None:
        """The weaker pin: for `ttl_s`, a session's blocks that reach the host are dropped from it last
        (an eviction order there; the device evicts them as any other). No-op without a host tier."""
        if self.host is None:
            return
        if ttl_s <= 0:
            self.host.unkeep(session_id)
        else:
            self.host.keep(session_id, block_hashes, self.clock() + ttl_s)

    def expire_pins(self) -> None:
        now = self.clock()
        if self.host is not None:
            self.host.expire(now)
        self.pins.expire(now)

    def pinned_sessions(self) -> dict[str, list[int]]:
        return self.pins.sessions()

    def is_pinned(self, block_hash: int) -> bool:
        return block_hash in self._pin_counts

    # --- internals

    def _hit_ids(self, seq: Sequence, num_hits: int) -> list[int]:
        """The blocks holding `seq`'s first `num_hits` (cached) blocks."""
        match = self._match
        if (
            match is not None
            and match.seq is seq
            and match.evictions == self._evictions
            and len(match.block_ids) >= num_hits
        ):
            return match.block_ids[:num_hits]
        return [self._by_hash[h] for h in seq.hashes(num_hits)[:num_hits]]

    def _take_free(self, n: int) -> list[int]:
        """`n` free blocks: uncached ones first (lowest id first), then cached ones least recently
        freed first, evicted (pinned ones last)."""
        taken: list[int] = []
        while self._uncached and len(taken) < n:
            taken.append(self._uncached.pop())
        if len(taken) < n:
            self.expire_pins()
            if len(self._evictable) + len(self._pinned_free) < n - len(taken):
                raise RuntimeError("no free KV block (the scheduler must check first)")
            self._cache_version += 1
            self._evictions += 1
            victims: list[tuple[int, int]] = []  # (hash, block id), in eviction order
            while len(taken) + len(victims) < n:
                order = self._evictable or self._pinned_free
                victims.append(order.popitem(last=False))
            if self.transfers is not None:
                self.transfers.store_evicted(victims, self.parent_of, self._by_hash, self.events)
            for block_hash, block_id in victims:
                del self._by_hash[block_hash]
                self.hash_of[block_id] = None
                self._removed.append(block_hash)
                taken.append(block_id)
        for block_id in taken:
            self.ref_counts[block_id] = 1
        self.num_used += n
        return taken

    # --- moves to and from the host tier (its side of them: engines/host_transfers.py)

    def offload(self, block_hashes: list[int]) -> int:
        """Move the free device blocks among `block_hashes` (a session waiting on a tool, say) to the
        host now, tail first, rather than have them dropped by a later eviction; returns how many
        moved. Blocks in use stay, and so do those the host has no room for (as if freed now). No-op
        without a host tier."""
        transfers = self.transfers
        if transfers is None:
            return 0
        victims = []
        for block_hash in reversed(block_hashes):
            order = self._evictable if block_hash in self._evictable else self._pinned_free
            block_id = order.pop(block_hash, None)
            if block_id is not None:
                victims.append((block_hash, block_id))
        if not victims:
            return 0
        self._cache_version += 1
        self._evictions += 1
        transfers.store_evicted(victims, self.parent_of, self._by_hash, self.events)
        moved = 0
        for block_hash, block_id in victims:
            if block_hash not in transfers.tier:
                self._free_order(block_hash)[block_hash] = block_id
                continue
            del self._by_hash[block_hash]
            self.hash_of[block_id] = None
            self._removed.append(block_hash)
            self._uncached.append(block_id)
            moved += 1
        return moved

    def _free_order(self, block_hash: int) -> OrderedDict[int, int]:
        """The free order a cached block joins when freed: the pinned one if a pin holds it."""
        return self._pinned_free if block_hash in self._pin_counts else self._evictable

    def prefetch(self, block_hashes: list[int], limit: int | None = None) -> int:
        """Onboard the host blocks that continue this chain's device prefix (a session's next turn is
        due) into free blocks, without evicting pinned ones: they wait on the device as free cached
        blocks, so that the turn finds them there. At most `limit` blocks (None: all there is room
        for). Returns how many. No-op without a host tier."""
        transfers = self.transfers
        if transfers is None:
            return 0
        start = 0
        while start < len(block_hashes) and block_hashes[start] in self._by_hash:
            start += 1
        room = len(self._uncached) + len(self._evictable)
        run: list[int] = []
        seen: set[int] = set()
        for block_hash in block_hashes[start : start + (room if limit is None else min(room, limit))]:
            if block_hash not in transfers.tier or block_hash in seen:
                break
            run.append(block_hash)
            seen.add(block_hash)
        if not run:
            return 0
        # the chain's own free device blocks leave the evictable order meanwhile, so that taking
        # blocks for the rest of it never evicts its head
        prefix = [(h, self._evictable.pop(h)) for h in block_hashes[:start] if h in self._evictable]
        slots = transfers.claim(run[: room - len(prefix)])
        run = run[: len(slots)]
        ids = self._take_free(len(run)) if run else []
        if run:
            self._onboard(ids, run, slots, block_hashes[start - 1] if start else None)
        self.num_used -= len(ids)
        for block_id in ids:
            self.ref_counts[block_id] = 0
        # the whole chain free again, as if just released by a sequence: tail first
        for block_hash, block_id in reversed(prefix + list(zip(run, ids, strict=True))):
            self._free_order(block_hash)[block_hash] = block_id
        return len(run)

    def _onboard(self, ids: list[int], hashes: list[int], slots: list[int], parent: int | None) -> None:
        """Fresh blocks `ids` receive the host's copies of `hashes` (a chain continuing `parent`):
        cached on the device from now (the copies run before any step reads them)."""
        assert self.transfers is not None
        self.transfers.onboarded(slots, ids)
        self._cache_version += 1
        first_parent = parent
        for block_hash, block_id in zip(hashes, ids, strict=True):
            self._by_hash[block_hash] = block_id
            self.hash_of[block_id] = block_hash
            self.parent_of[block_id] = parent
            parent = block_hash
        self._stored(hashes, first_parent)

    def _flush_host_removed(self) -> None:
        if self.transfers is not None:
            self.transfers.flush_removed(self.events)

    # --- events

    def _stored(self, hashes: list[int], parent: int | None) -> None:
        self._flush_removed()
        self.events.append(BlockStored(hashes, parent))

    def _flush_removed(self) -> None:
        if self._removed:
            self.events.append(BlockRemoved(self._removed))
            self._removed = []
