"""Paged KV blocks with a prefix cache keyed by `router.hashing` chain hashes.

A block is in use (ref count > 0), or free. A free block is either uncached (no hash: never filled,
or a duplicate of a block cached elsewhere) or cached: it keeps its KV and its hash until it is
reused, so a later prompt with the same prefix skips computing it. Allocation takes uncached blocks
first, then evicts cached ones least recently freed first, pinned ones last. Pins (a session's
blocks, with a TTL) are only an eviction order: they never make an allocation fail.

Every change of the cached set is appended to `events` (BlockStored, BlockRemoved, AllBlocksCleared),
in order; the engine drains them after each step. Replaying them reproduces `cached_blocks()`.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from itertools import compress, count, islice, repeat, takewhile
from operator import add, eq, is_not, itemgetter, ne, not_, or_, setitem, sub

from engines.sequence import Sequence
from router.protocol import AllBlocksCleared, BlockRemoved, BlockStored, CachedBlock, KvEvent

_is_block = partial(is_not, None)  # a hash's block id, not a miss (`dict.get`'s None)


def _get_all(source: Mapping[int, int] | list[int], keys: list[int]) -> list[int]:
    """`[source[k] for k in keys]` in one C call (an itemgetter reads ~1.6x faster than a map over
    `__getitem__`)."""
    if len(keys) > 1:
        return list(itemgetter(*keys)(source))
    return [source[keys[0]]] if keys else []


def _set_all(target: list[int | None], keys: Iterable[int], values: Iterable[int | None]) -> None:
    """`target[k] = v` for each pair, in a C loop (`operator.setitem` is ~2x faster than a map over
    the list's `__setitem__` wrapper)."""
    deque(map(setitem, repeat(target), keys, values), maxlen=0)


# a free order is rebuilt without its dead front slots once evictions have stepped over this many
# per live entry since (stepping over one costs ~1/30 of copying one)
REBUILD_FACTOR = 30


class Pin:
    __slots__ = ("block_hashes", "expires_at")

    def __init__(self, block_hashes: list[int], expires_at: float) -> None:
        self.block_hashes = block_hashes
        self.expires_at = expires_at


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        clock: Callable[[], float],
        max_pinned_blocks: int | None = None,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.clock = clock
        self.max_pinned_blocks = num_blocks // 2 if max_pinned_blocks is None else max_pinned_blocks
        # per block: its users, and its parent hash (read only while the block is cached: an evicted
        # block's stale parent is never cleared); plain lists so that whole runs of blocks are read and
        # written in C loops (`_get_all`, `_set_all`). A block's own hash is not kept per
        # block: `_by_hash` says which block holds a hash, and a sequence's committed blocks have the
        # hashes of its chain (those that stayed uncached, duplicates, are flagged on the sequence)
        self.ref_counts = [0] * num_blocks
        self.parent_of: list[int | None] = [None] * num_blocks
        self.num_used = 0
        self.events: list[KvEvent] = []
        # free blocks by class; the two orders map a cached free block's hash to its id, in eviction
        # order (least recently freed first): keyed by hash, since pins and evictions start from hashes.
        # Plain dicts (insertion ordered; half the cost of an OrderedDict per insert and delete), but a
        # dict leaves a dead slot per deletion, which a scan from the front (an eviction) steps over
        # until the dict resizes: per order, `_front_dead` counts the evictions since it was last
        # rebuilt (the dead slots at its front) and `_scanned` the slots evictions stepped over since
        # (see `_victims`; rebuilding never changes an order, only the work of reading its front)
        self._uncached: list[int] = list(range(num_blocks - 1, -1, -1))
        self._evictable: dict[int, int] = {}
        self._pinned_free: dict[int, int] = {}
        self._front_dead = [0, 0]  # evictable, pinned free
        self._scanned = [0, 0]
        self._by_hash: dict[int, int] = {}
        self._pins: dict[str, Pin] = {}
        self._pin_counts: dict[int, int] = {}
        self.num_pinned = 0
        self._next_expiry = math.inf
        self._removed: list[int] = []  # evictions not yet turned into one BlockRemoved event
        # The scheduler (and the simulator's fast-forward) ask about the same waiting head step after
        # step; a 2,000-block answer is kept until what it depends on changes. `_cache_version` counts
        # changes of the cached set, `_evict_version` removals from it, `_version` all those and every
        # change of refs or free blocks.
        self._cache_version = 0
        self._version = 0
        self._evict_version = 0  # removals from the cached set only
        # seq, evict version, limit, hits, cache version, the hit blocks' ids (allocate reads them)
        self._match_memo: tuple[Sequence, int, int, int, int, list[int]] | None = None
        self._fit_memo: tuple[Sequence, int, int, int, bool] | None = None  # seq, version, len, hits, fits

    # --- state

    @property
    def num_free(self) -> int:
        return len(self._uncached) + len(self._evictable) + len(self._pinned_free)

    @property
    def num_cached(self) -> int:
        return len(self._by_hash)

    def usage(self) -> float:
        return self.num_used / self.num_blocks

    def cached_blocks(self) -> list[CachedBlock]:
        parent_of = self.parent_of
        return [CachedBlock(h, parent_of[b]) for h, b in self._by_hash.items()]

    def is_cached(self, block_hash: int) -> bool:
        return block_hash in self._by_hash

    @property
    def has_events(self) -> bool:
        return bool(self.events or self._removed)

    def take_events(self) -> list[KvEvent]:
        self._flush_removed()
        events, self.events = self.events, []
        return events

    # --- allocation

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> int:
        """Leading full blocks of `seq` that are cached, keeping at least one token to compute."""
        limit = (len(seq) - 1) // self.block_size
        memo = self._match_memo
        ids: list[int] = []
        if memo is not None and memo[0] is seq and memo[1] == self._evict_version and memo[2] == limit:
            # nothing left the cache since: the blocks matched then still match (in the same blocks),
            # only look further
            ids = memo[5]
            if len(ids) == limit or memo[4] == self._cache_version:
                return len(ids)
        if len(ids) < limit:
            # the cached set is not prefix-closed (a parent can be evicted before its child): the
            # first miss is found by a scan, in C, that stops there
            chain = islice(seq.hashes(limit), len(ids), limit)
            ids = ids + list(takewhile(_is_block, map(self._by_hash.get, chain)))
        self._match_memo = (seq, self._evict_version, limit, len(ids), self._cache_version, ids)
        return len(ids)

    def _hit_ids(self, seq: Sequence, num_hits: int) -> list[int]:
        """The blocks holding `seq`'s first `num_hits` (cached) blocks: as `match_prefix` found them
        when nothing was evicted since, else looked up."""
        memo = self._match_memo
        if memo is not None and memo[0] is seq and memo[1] == self._evict_version and memo[3] >= num_hits:
            return memo[5][:num_hits]
        return _get_all(self._by_hash, seq.hashes(num_hits)[:num_hits])

    def can_allocate(self, seq: Sequence, num_hits: int) -> bool:
        need = self.blocks_needed(len(seq)) - num_hits
        free = self.num_free
        if free < need:
            return False
        if free - num_hits >= need:
            return True  # even if every hit were a free block
        memo = self._fit_memo
        if (
            memo is not None
            and memo[0] is seq
            and memo[1] == self._version
            and memo[2] == len(seq)
            and memo[3] == num_hits
        ):
            return memo[4]
        # hit blocks nobody uses are counted as free now but will not be once allocated
        free_hits = _get_all(self.ref_counts, self._hit_ids(seq, num_hits)).count(0)
        fits = free - free_hits >= need
        self._fit_memo = (seq, self._version, len(seq), num_hits, fits)
        return fits

    def allocate(self, seq: Sequence, num_hits: int) -> None:
        """Give `seq` its cached prefix (`num_hits` blocks) and fresh blocks for the rest of its tokens.
        The caller checked `can_allocate`."""
        self._version += 1
        table = seq.block_table
        if num_hits:
            hashes = seq.hashes(num_hits)[:num_hits]
            ids = self._hit_ids(seq, num_hits)
            refs = self.ref_counts
            before = _get_all(refs, ids)
            evictable = self._evictable
            if len(set(ids)) == len(ids):
                # hit blocks nobody used leave the free lists; each one is in one of the two
                if before.count(0) == len(before):
                    unused = hashes  # the common case: every hit block was free
                    _set_all(refs, ids, repeat(1))
                else:
                    unused = list(compress(hashes, map(not_, before)))
                    _set_all(refs, ids, map(add, before, repeat(1)))
                if unused:
                    # from the free order that holds the last of them first (a session's own earlier
                    # blocks are pinned), then, for those it did not hold, from the other
                    orders = (evictable, self._pinned_free)
                    if unused[-1] not in evictable:
                        orders = orders[::-1]
                    size = len(orders[0])
                    list(map(orders[0].pop, unused, repeat(None)))
                    if size - len(orders[0]) != len(unused):
                        list(map(orders[1].pop, unused, repeat(None)))
                self.num_used += len(unused)
            else:  # a hash listed twice: the second reference finds the block in use
                pinned_free = self._pinned_free
                for block_hash, block_id in zip(hashes, ids, strict=True):
                    count = refs[block_id]
                    if not count:
                        if block_hash in evictable:
                            del evictable[block_hash]
                        else:
                            del pinned_free[block_hash]
                        self.num_used += 1
                    refs[block_id] = count + 1
            table.extend(ids)
        fresh = self.blocks_needed(len(seq)) - num_hits
        if fresh > 0:
            table.extend(self._take_free(fresh))
        seq.num_computed_tokens = num_hits * self.block_size
        seq.num_committed_blocks = num_hits
        if seq.num_cached_tokens < 0:
            seq.num_cached_tokens = seq.num_computed_tokens

    def can_append(self, seq: Sequence, num_tokens: int) -> bool:
        need = self.blocks_needed(seq.num_computed_tokens + num_tokens) - len(seq.block_table)
        return need <= self.num_free

    def append_slots(self, seq: Sequence, num_tokens: int) -> None:
        """Blocks for `num_tokens` more computed tokens (decode crossing a block boundary)."""
        table = seq.block_table
        fresh = self.blocks_needed(seq.num_computed_tokens + num_tokens) - len(table)
        if fresh > 0:
            self._version += 1
            table.extend(self._take_free(fresh))

    def commit(self, seq: Sequence) -> None:
        """Offer the blocks `seq` has fully computed to the prefix cache (after a step)."""
        full = seq.num_computed_tokens // self.block_size
        start = seq.num_committed_blocks
        if full <= start:
            return
        seq.num_committed_blocks = full
        self._version += 1
        self._cache_version += 1
        hashes = seq.hashes(full)
        chain = hashes[start:full]
        ids = seq.block_table[start:full]
        parent = hashes[start - 1] if start else None
        by_hash = self._by_hash
        # the common case, all new: one pass both looks each hash up and adds it. A hash cached
        # already (or listed twice) answers another block than ours; what was added is then undone and
        # the slow path below takes the run block by block. (No block of the run can be cached yet:
        # blocks past the committed ones are fresh.)
        got = list(map(by_hash.setdefault, chain, ids))
        if got == ids:
            parents = hashes[start - 1 : full - 1] if start else [None, *chain[:-1]]
            _set_all(self.parent_of, ids, parents)
            self._stored(chain, parent)
            return
        list(map(by_hash.__delitem__, compress(chain, map(eq, got, ids))))
        seq.has_anonymous_blocks = True
        parent_of = self.parent_of
        run: list[int] = []
        run_parent: int | None = None
        for block_hash, block_id in zip(chain, ids, strict=True):
            if block_hash in by_hash:
                # the same content is cached in another block: this one stays anonymous
                if run:
                    self._stored(run, run_parent)
                    run = []
            else:
                parent_of[block_id] = parent
                by_hash[block_hash] = block_id
                if not run:
                    run_parent = parent
                run.append(block_hash)
            parent = block_hash
        if run:
            self._stored(run, run_parent)

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks, tail first, so that a chain's tail is evicted before its head."""
        table = seq.block_table
        if table:
            self._version += 1
            committed = seq.num_committed_blocks
            if committed < len(table):
                # past the committed blocks: fresh ones, never cached, so never hit and held by this
                # sequence alone: straight to the uncached list, which takes them before the others
                tail = table[committed:]
                tail.reverse()
                _set_all(self.ref_counts, tail, repeat(0))
                self._uncached.extend(tail)
                self.num_used -= len(tail)
            if committed:
                head = table[committed - 1 :: -1]
                self._free_committed(head, seq.block_hashes[committed - 1 :: -1], seq.has_anonymous_blocks)
            table.clear()
        seq.num_committed_blocks = 0
        seq.has_anonymous_blocks = False

    def _free_committed(self, order: list[int], hashes: list[int], anonymous: bool) -> None:
        """Release committed blocks and their chain hashes, in release order; `anonymous`: some of them
        are not cached (their content was, in another block)."""
        refs = self.ref_counts
        before = _get_all(refs, order)
        if before.count(1) == len(order):
            released = order  # the common case (a block listed twice would count 2 or more)
            _set_all(refs, order, repeat(0))
        elif len(set(order)) == len(order):
            _set_all(refs, order, map(sub, before, repeat(1)))
            last = list(map(eq, before, repeat(1)))
            released = list(compress(order, last))
            hashes = list(compress(hashes, last))
        else:
            released = []
            kept = []
            for block_id, block_hash in zip(order, hashes, strict=True):
                count = refs[block_id] - 1
                refs[block_id] = count
                if not count:
                    released.append(block_id)
                    kept.append(block_hash)
            hashes = kept
        self.num_used -= len(released)
        # each free list takes its blocks in release order, as one by one would
        if anonymous:
            cached = list(map(eq, map(self._by_hash.get, hashes), released))
            self._uncached.extend(compress(released, map(not_, cached)))
            released = list(compress(released, cached))
            hashes = list(compress(hashes, cached))
        counts = self._pin_counts
        if not counts or counts.keys().isdisjoint(hashes):
            self._evictable.update(zip(hashes, released, strict=True))  # the common case: none pinned
            return
        pinned = list(map(counts.__contains__, hashes))
        first = pinned.index(True)
        if pinned.count(True) == len(pinned) - first:
            # pinned from some block on: a chain's head (released last) that its session pinned
            self._evictable.update(zip(hashes[:first], released[:first], strict=True))
            self._pinned_free.update(zip(hashes[first:], released[first:], strict=True))
            return
        free = list(map(not_, pinned))
        self._evictable.update(zip(compress(hashes, free), compress(released, free), strict=True))
        self._pinned_free.update(zip(compress(hashes, pinned), compress(released, pinned), strict=True))

    def reset(self) -> bool:
        """Drop every cached block; refused (False) while any block is in use."""
        if self.num_used:
            return False
        self._flush_removed()
        self._version += 1
        self._cache_version += 1
        self._evict_version += 1
        self._by_hash.clear()
        self._evictable.clear()
        self._pinned_free.clear()
        self._front_dead = [0, 0]
        self._scanned = [0, 0]
        self._uncached = list(range(self.num_blocks - 1, -1, -1))
        self.events.append(AllBlocksCleared())
        return True

    # --- pins

    def pin(self, session_id: str, block_hashes: list[int], ttl_s: float) -> int:
        """Make a session's blocks the last to be evicted for `ttl_s`; returns how many were pinned
        (fewer than asked when the cap on pinned blocks is reached; the prefix is kept)."""
        self.expire_pins()
        old = self._pins.pop(session_id, None)
        if old is not None and ttl_s > 0:
            grown = self._pin_grown(session_id, old, block_hashes, ttl_s)
            if grown is not None:
                return grown
        # a session pins again after each turn: its old pin's free blocks (released) rejoin the
        # evictable order as if freed now, and those pinned again (usually all: the chain grew) then
        # move to the pinned end below; they are left in the pinned order until it is known
        released = self._release(old) if old is not None else []
        room = self.max_pinned_blocks - self.num_pinned
        hashes = list(dict.fromkeys(block_hashes))[: max(room, 0)]
        if ttl_s <= 0 or not hashes:
            self._to_evictable(released)
            return 0
        expires_at = self.clock() + ttl_s
        self._pins[session_id] = Pin(hashes, expires_at)
        self.num_pinned += len(hashes)
        self._next_expiry = min(self._next_expiry, expires_at)
        # C loops over the (distinct) hashes: count them, then move the newly pinned free blocks from
        # the evictable order to the end of the pinned one, tail first: when pinned blocks must go, a
        # chain loses its tail before its head (a lost head makes the whole rest unmatchable)
        counts = self._pin_counts
        before = list(map(counts.get, hashes, repeat(0)))
        counts.update(zip(hashes, map(add, before, repeat(1)), strict=True))
        first = hashes
        if before.count(0) != len(before):
            first = list(compress(hashes, map(not_, before)))
        evictable = self._evictable
        pinned_free = self._pinned_free
        if released:
            # of the new pin's first holders, those in the pinned order are the released ones (any
            # other pinned block has a pin count): when the released blocks lead the moved ones, in
            # the same order, they stay in the pinned order and only go to its end, behind the others
            in_order = map(or_, map(pinned_free.__contains__, first), map(evictable.__contains__, first))
            moved = list(compress(first, in_order))
            if moved[: len(released)] == released:
                moved = moved[len(released) :]
                moved.reverse()
                pinned_free.update(zip(moved, map(evictable.pop, moved), strict=True))
                # to the end, last released first (a pop and a re-insert each, in one C loop)
                released.reverse()
                pinned_free.update(zip(released, map(pinned_free.pop, released), strict=True))
                return len(hashes)
            self._to_evictable(released)
        moved = list(compress(first, map(evictable.__contains__, first)))
        moved.reverse()
        pinned_free.update(zip(moved, map(evictable.pop, moved), strict=True))
        return len(hashes)

    def _pin_grown(self, session_id: str, old: Pin, block_hashes: list[int], ttl_s: float) -> int | None:
        """The usual re-pin, after a turn: the session's chain grew from a point on (its old pin's last
        blocks may differ: a trace's partial last block, an edited turn), and no pin holds the new part.
        `pin`'s end state without recounting the common prefix: the old pin's free blocks that leave
        it rejoin the evictable order, tail first; the newly pinned free blocks, then the prefix's free
        blocks that only this pin held, move to the end of the pinned order, each tail first. None,
        with nothing changed, in any other case (then `pin` releases and counts everything)."""
        hashes = old.block_hashes
        n = len(hashes)
        common = next(compress(count(), map(ne, hashes, block_hashes)), min(n, len(block_hashes)))
        tail = block_hashes[common:]
        counts = self._pin_counts
        if (
            not block_hashes  # no pin at all: the old one's blocks all leave it
            or self.num_pinned - n + common + len(tail) > self.max_pinned_blocks
            or not counts.keys().isdisjoint(tail)
            or len(set(tail)) != len(tail)
        ):
            return None
        pinned_free = self._pinned_free
        if common < n:  # the blocks that leave the pin, as `_release` and `_to_evictable` would
            left = self._uncount(hashes[common:])
            self._to_evictable(list(compress(left, map(pinned_free.__contains__, left))))
            del hashes[common:]
        # the prefix's free blocks this pin alone holds are in the pinned order (a pinned free block
        # always is; a shared stem stays where it is): taken out, tail first, to go back at the end
        sole = hashes
        before = _get_all(counts, hashes)
        if before.count(1) != common:
            sole = list(compress(hashes, map(eq, before, repeat(1))))
        released, ids = self._take_pinned_free(sole[::-1])
        counts.update(zip(tail, repeat(1)))
        evictable = self._evictable
        moved = list(compress(tail, map(evictable.__contains__, tail)))
        moved.reverse()
        pinned_free.update(zip(moved, map(evictable.pop, moved), strict=True))
        pinned_free.update(zip(released, ids, strict=True))
        hashes += tail  # the old pin's list (distinct hashes) becomes the new one's
        expires_at = self.clock() + ttl_s
        self._pins[session_id] = Pin(hashes, expires_at)
        self.num_pinned += len(hashes) - n
        self._next_expiry = min(self._next_expiry, expires_at)
        return len(hashes)

    def _take_pinned_free(self, hashes: list[int]) -> tuple[list[int], list[int]]:
        """Take those of `hashes` that are in the pinned free order out of it; returns their hashes and
        block ids, in the given order."""
        ids = list(map(self._pinned_free.pop, hashes, repeat(None)))
        present = list(map(is_not, ids, repeat(None)))
        if present.count(True) == len(present):
            return hashes, ids
        return list(compress(hashes, present)), list(compress(ids, present))

    def unpin(self, session_id: str) -> None:
        self._unpin(session_id)

    def expire_pins(self) -> None:
        now = self.clock()
        if now < self._next_expiry:
            return
        expired = [s for s, pin in self._pins.items() if pin.expires_at <= now]
        for session_id in expired:
            self._unpin(session_id)
        self._next_expiry = min((p.expires_at for p in self._pins.values()), default=math.inf)

    def pinned_sessions(self) -> dict[str, list[int]]:
        return {s: list(p.block_hashes) for s, p in self._pins.items()}

    def is_pinned(self, block_hash: int) -> bool:
        return block_hash in self._pin_counts

    def _unpin(self, session_id: str) -> None:
        pin = self._pins.pop(session_id, None)
        if pin is not None:
            self._to_evictable(self._release(pin))

    def _release(self, pin: Pin) -> list[int]:
        """Uncount a pin (already off `_pins`); returns the hashes of the free blocks it was the last pin
        of, in pin order."""
        self.num_pinned -= len(pin.block_hashes)
        dropped = self._uncount(pin.block_hashes)
        return list(compress(dropped, map(self._pinned_free.__contains__, dropped)))

    def _uncount(self, hashes: list[int]) -> list[int]:
        """One pin less on each of `hashes` (distinct); returns those no pin holds any more, in order."""
        counts = self._pin_counts
        # one pass both reads and drops the counts; those other pins hold too are put back, one less
        # (the order of the counts' keys is never read)
        before = list(map(counts.pop, hashes))
        if before.count(1) == len(before):
            return hashes  # the common case: pinned by this pin alone
        counts.update((h, c - 1) for h, c in zip(hashes, before, strict=True) if c > 1)
        return list(compress(hashes, map(eq, before, repeat(1))))

    def _to_evictable(self, hashes: list[int]) -> None:
        """Free blocks a pin no longer holds (by hash, in pin order) leave the pinned order and rejoin the
        evictable one as if freed now, tail first. Not at its front: a session's pin also holds the
        prefix other sessions share (a system prompt), which would then be evicted before their own
        blocks and orphan every chain on it."""
        if hashes:
            tail_first = hashes[::-1]
            self._evictable.update(zip(tail_first, map(self._pinned_free.pop, tail_first), strict=True))

    # --- internals

    def _take_free(self, n: int) -> list[int]:
        """`n` free blocks, in the order single takes would give them: uncached ones first (lowest id
        first), then cached ones least recently freed first, evicted (pinned ones last)."""
        uncached = self._uncached
        k = min(n, len(uncached))
        taken = uncached[-1 : -k - 1 : -1] if k else []
        del uncached[len(uncached) - k :]
        rest = n - k
        if rest:
            self.expire_pins()
            if len(self._evictable) + len(self._pinned_free) < rest:
                raise RuntimeError("no free KV block (the scheduler must check first)")
            self._cache_version += 1
            self._evict_version += 1
            # C loops over the run: take the victims' hashes in eviction order, then their ids as
            # they leave the free order, then uncache them
            hashes = self._victims(0, rest)
            if len(hashes) < rest:
                hashes += self._victims(1, rest - len(hashes))
            by_hash = self._by_hash
            victims = list(map(by_hash.pop, hashes))
            self._removed.extend(hashes)
            taken += victims
        _set_all(self.ref_counts, taken, repeat(1))
        self.num_used += n
        return taken

    def _victims(self, which: int, n: int) -> list[int]:
        """Remove the first `n` (at most) entries of a free order (0: evictable, 1: pinned); returns
        their hashes."""
        order = self._pinned_free if which else self._evictable
        if n >= len(order):
            hashes = list(order)
            order.clear()  # a fresh, empty table
            self._front_dead[which] = self._scanned[which] = 0
            return hashes
        # the scan from the front steps over the slots earlier evictions left (at most); once that
        # has cost about as much as copying the live entries, the order is rebuilt without them
        dead = self._front_dead[which]
        scanned = self._scanned[which] + dead
        if scanned > REBUILD_FACTOR * len(order):
            order = dict(order)
            if which:
                self._pinned_free = order
            else:
                self._evictable = order
            dead = scanned = 0
        hashes = list(islice(order, n))
        list(map(order.__delitem__, hashes))
        self._front_dead[which] = dead + n
        self._scanned[which] = scanned
        return hashes

    def _stored(self, hashes: list[int], parent: int | None) -> None:
        self._flush_removed()
        self.events.append(BlockStored(hashes, parent))

    def _flush_removed(self) -> None:
        if self._removed:
            self.events.append(BlockRemoved(self._removed))
            self._removed = []
