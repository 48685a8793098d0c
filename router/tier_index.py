"""One tier's blocks: block hash -> bitmask of the workers holding it, and each worker's prefix of a chain.

`prefixes(chain)` must be each worker's matched prefix, stopping at the first miss as the engines do;
the index bisects (`router.prefix_match`), which is exact while a worker's held set is prefix-closed
along the chain (it holds a block only if it holds the block's parent). To stay exact on arbitrary
event streams, the index tracks "orphans": blocks a worker holds while not holding their parent
(stored before the parent arrived, or left behind when the parent was evicted first). A worker with
orphans is answered by a linear walk instead. Orphans are tracked as a superset (a stale mark only
costs speed, never exactness), via parent -> children links.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import compress, islice, repeat
from operator import and_, is_, is_not, ne, not_, or_, xor
from typing import Any, cast

from router.prefix_match import bisect_prefixes, expand, walk_prefixes

# A block's children are pruned of blocks nobody holds any more once there are this many, then each
# time their number doubles, so they stay bounded at O(1) amortized per link.
_CHILDREN_PRUNE_LEN = 8


Runs = list[tuple[int, int]]  # [a, b) index ranges of a list


class Children(set):
    """A block's children when it has several (one child is kept as a bare hash)."""

    __slots__ = ("prune_at",)

    def __init__(self, kids: Iterable[int] = ()) -> None:
        super().__init__(kids)
        self.prune_at = _CHILDREN_PRUNE_LEN


def _zero_runs(rest: list[int], zeros: int) -> Runs:
    """The [a, b) runs of zeros in `rest`, which holds `zeros` of them."""
    if 0 not in rest[zeros:]:
        return [(0, zeros)]  # the usual leaf-first eviction: the blocks nobody else holds come first
    flags = list(map(not_, rest))
    runs = []
    b = 0
    while zeros:
        a = flags.index(True, b)
        b = a + zeros if a + zeros == len(flags) else flags.index(False, a)
        runs.append((a, b))
        zeros -= b - a
    return runs


def _chain_starts(hashes: list[int], links: list) -> list[int] | None:
    """The positions where a chain begins in `hashes` (listed leaf first, each block's child the block
    before it unless a chain begins there), given each block's children entry `links`; None when a
    block is listed twice."""
    if links[1:] == hashes[:-1]:
        # one chain: a block listed twice would need a cycle through links[0], in the list then
        kid = links[0]
        if type(kid) is not int or kid not in hashes:
            return [0]
        starts = [0]
    else:
        starts = [0, *compress(range(1, len(hashes)), map(ne, links[1:], hashes[:-1]))]
    return starts if len(set(hashes)) == len(hashes) else None


class TierIndex:
    """The blocks of one tier: block hash -> worker bitmask, with the orphan bookkeeping above."""

    __slots__ = ("_children", "_dead_parents", "_dirty", "_held", "_orphan_count", "_orphans")

    def __init__(self) -> None:
        self._held: dict[int, int] = {}
        self._children: dict[int, int | Children] = {}  # parent -> child or children (a superset)
        self._orphans: dict[int, int] = {}  # block -> bits of workers holding it but not its parent
        self._orphan_count: dict[int, int] = {}  # worker bit -> its orphan count
        self._dirty = 0  # bits of workers with orphans
        # Blocks nobody holds whose children someone still holds: their links are kept (so the parent's
        # return adopts the children) and swept once those children are gone too.
        self._dead_parents: list[int] = []

    def __len__(self) -> int:
        return len(self._held)

    def get(self, block_hash: int) -> int:
        return self._held.get(block_hash, 0)

    @property
    def dirty_mask(self) -> int:
        return self._dirty

    def store(self, bit: int, hashes: Sequence[int], parent: int | None) -> int:
        """Worker `bit` holds `hashes` (a chain continuing `parent`); returns how many were new."""
        held = self._held
        if held.keys().isdisjoint(hashes):
            return self._store_fresh(bit, hashes, parent)
        masks = list(map(held.get, hashes, repeat(0)))
        news = list(map(or_, masks, repeat(bit)))
        # or-ing adds `bit` to each mask without it: the sums differ by n * bit when none had it
        if sum(news) - sum(masks) == len(masks) * bit:
            distinct = set(hashes)
            if len(distinct) == len(hashes) and parent not in distinct:
                return self._store_new(bit, hashes, parent, news)
        return self._store_loop(bit, hashes, parent)

    def _store_loop(self, bit: int, hashes: Sequence[int], parent: int | None) -> int:
        """Any store, one block at a time (blocks listed twice, some held already)."""
        held = self._held
        get = held.get
        children = self._children
        child_of = children.get
        orphans = self._orphans
        orphan_of = orphans.get
        added = 0
        prev = parent
        for h in hashes:
            m = get(h, 0)
            if not m & bit:
                held[h] = m | bit if m else bit
                added += 1
                if prev is not None and prev is parent and not get(prev, 0) & bit:
                    self._mark(h, bit)  # stored before (or without) its parent
                if orphans:
                    # `_adopt` inlined down to the lookups: most blocks have no orphaned child here
                    kids = child_of(h)
                    if kids is not None:
                        for kid in kids if isinstance(kids, Children) else (kids,):
                            if orphan_of(kid, 0) & bit:
                                self._unmark(kid, bit)
            if prev is not None:
                kids = child_of(prev)
                if kids is None:
                    children[prev] = h
                elif kids != h:
                    self._link(prev, kids, h)
            prev = h
        return added

    def remove(self, bit: int, hashes: Iterable[int]) -> int:
        """Worker `bit` no longer holds `hashes`; returns how many it did hold."""
        held = self._held
        if type(hashes) is not list:
            hashes = list(hashes)
        # Taken out first: one pass for the usual eviction, blocks only `bit` held. The run paths put
        # back the blocks others hold, with `bit` off; any other case puts back all and loops.
        masks = list(map(held.pop, hashes, repeat(None)))
        n = len(masks)
        if masks.count(bit) == n:
            return self._remove_alone(bit, hashes)
        if None not in masks:
            held_masks = cast("list[int]", masks)  # every block was held
            rest = list(map(xor, held_masks, repeat(bit)))
            # xor takes `bit` off a mask holding it and adds it to one that does not: the sums differ
            # by n * bit exactly when every block was held by `bit`
            if sum(held_masks) - sum(rest) == n * bit:
                return self._remove_held(bit, hashes, held_masks, rest)
        held.update((h, m) for h, m in zip(hashes, masks, strict=True) if m)  # put back, for the loop
        return self._remove_loop(bit, hashes)

    def _remove_loop(self, bit: int, hashes: list[int]) -> int:
        """Any removal, one block at a time (blocks listed twice, some not held)."""
        held = self._held
        get = held.get
        children = self._children
        child_of = children.get
        orphans = self._orphans
        orphan_of = orphans.get
        removed = 0
        for h in hashes:
            m = get(h, 0)
            if not m & bit:
                continue  # idempotent: already gone, or a removal that overtook its store
            m ^= bit
            if m:
                held[h] = m
            else:
                del held[h]
            removed += 1
            if orphans and orphan_of(h, 0) & bit:
                self._unmark(h, bit)
            kids = child_of(h)
            if kids is not None:
                orphaned = False
                for kid in kids if isinstance(kids, Children) else (kids,):
                    kid_mask = get(kid, 0)
                    if kid_mask & bit:
                        self._mark(kid, bit)  # its parent left before it did
                    orphaned = orphaned or bool(kid_mask)
                if not m:
                    if orphaned:
                        self._dead_parents.append(h)
                    else:
                        del children[h]
        self._sweep_if_many_dead()
        return removed

    def _store_fresh(self, bit: int, hashes: Sequence[int], parent: int | None) -> int:
        """The common case, in C loops: blocks nobody holds yet, a chain linked parent to child."""
        held = self._held
        children = self._children
        before = len(held)
        held.update(zip(hashes, repeat(bit)))
        if self._dirty & bit:  # only a worker with orphans can adopt any
            self._adopt_all(bit, hashes)  # returning parents whose children stayed
            # the links to the children it adopted must stay: merged, as for blocks others hold
            self._merge_links(hashes[:-1], hashes[1:])
        else:
            # Overwriting a link of a block nobody held loses nothing exactness needs: every worker
            # holding that old child was marked when the block left it (and `bit` holds none).
            children.update(zip(hashes, islice(hashes, 1, None), strict=False))
        if parent is not None:
            if not held.get(parent, 0) & bit:
                self._mark(hashes[0], bit)
            kids = children.get(parent)
            if kids is None:
                children[parent] = hashes[0]
            elif kids != hashes[0]:
                self._link(parent, kids, hashes[0])
        return len(held) - before  # a block listed twice counts once

    def _store_new(self, bit: int, hashes: Sequence[int], parent: int | None, news: list[int]) -> int:
        """Blocks new to worker `bit` (some held by others: a shared prefix), each listed once, not
        `parent`, `news` their masks with `bit`: `store`'s loop in C loops, with the loop's end state.
        Links to children are merged, never overwritten, as others hold these blocks."""
        held = self._held
        if self._dirty & bit:
            self._adopt_all(bit, hashes)  # their children held by `bit` are orphans no more
        held.update(zip(hashes, news, strict=True))
        if parent is not None:
            if not held.get(parent, 0) & bit:
                self._mark(hashes[0], bit)  # stored before (or without) its parent
            prevs: Sequence[int] = [parent, *hashes[:-1]]
            nexts: Sequence[int] = hashes
        else:
            prevs, nexts = hashes[:-1], hashes[1:]
        self._merge_links(prevs, nexts)
        return len(hashes)

    def _merge_links(self, prevs: Sequence[int], nexts: Sequence[int]) -> None:
        """Link each of `prevs` to the child in `nexts`, keeping the children it has."""
        # the missing links set in the same pass; the rest mostly are these very links already
        links = list(map(self._children.setdefault, prevs, nexts))
        if links != list(nexts):
            # parents with another child already: rare, merged one by one
            for prev, kids, h in zip(prevs, links, nexts, strict=True):
                if kids != h:
                    self._link(prev, kids, h)

    def _remove_held(self, bit: int, hashes: list[int], masks: list[int], rest: list[int]) -> int:
        """Blocks worker `bit` held, taken out of `_held` by `remove`, `masks` their holders, `rest`
        the others among them: the common shared-block eviction, in C loops, with the end state
        `remove`'s loop leaves.

        Engines evict chains leaf first, so a block's child is mostly the block listed just before it,
        which `bit` no longer holds either: no orphan there, and the child of a block gone everywhere
        (`rest` 0) is gone too, unless the run of such blocks begins there. Only the chains' first
        blocks (`starts`) have children to look up."""
        zeros = rest.count(0)
        runs = _zero_runs(rest, zeros) if zeros else []
        links = self._take_links(hashes, runs)
        starts = _chain_starts(hashes, links)
        if starts is None:  # a block listed twice: put everything back for the loop
            self._put_back(hashes, masks, links, runs)
            return self._remove_loop(bit, hashes)
        self._hold_rest(hashes, rest, runs)
        if self._dirty & bit:
            self._unmark_all(bit, hashes)
        self._keep_run_links(hashes, links, runs, starts)
        for j in starts:
            kids = links[j]
            if kids is None:
                continue
            if rest[j]:
                self._orphan_kids(bit, kids)
            elif self._orphan_kids(bit, kids):  # gone everywhere: the links live while a child does
                self._children[hashes[j]] = kids
                self._dead_parents.append(hashes[j])
        self._sweep_if_many_dead()
        return len(hashes)

    def _take_links(self, hashes: list[int], runs: Runs) -> list:
        """The children entry of each block (None: none), taken out for the blocks gone everywhere
        (the `runs` of zeros in their rest)."""
        children = self._children
        links: list = []
        done = 0
        for a, b in runs:
            links += map(children.get, hashes[done:a])
            links += map(children.pop, hashes[a:b], repeat(None))
            done = b
        links += map(children.get, hashes[done:])
        return links

    def _put_back(self, hashes: list[int], masks: list[int], links: list, runs: Runs) -> None:
        """Undo `_take_links` and `remove`'s take-out: every block held and linked as it was."""
        children = self._children
        for a, b in runs:
            gone = zip(hashes[a:b], links[a:b], strict=True)
            children.update(compress(gone, map(is_not, links[a:b], repeat(None))))
        self._held.update(zip(hashes, masks, strict=True))

    def _hold_rest(self, hashes: list[int], rest: list[int], runs: Runs) -> None:
        """The blocks others still hold back in `_held` with their `rest`, those of `runs` left out."""
        held = self._held
        done = 0
        for a, b in runs:
            held.update(zip(hashes[done:a], rest[done:a], strict=True))
            done = b
        held.update(zip(hashes[done:], rest[done:], strict=True))

    def _keep_run_links(self, hashes: list[int], links: list, runs: Runs, starts: list[int]) -> None:
        """A run of blocks gone everywhere that begins inside a chain: its first block's child, listed
        before it, is still held by others, so that block's links stay (a dead parent)."""
        first = set(starts) if len(starts) > 8 else starts
        for a, _ in runs:
            if a not in first:
                self._children[hashes[a]] = links[a]
                self._dead_parents.append(hashes[a])

    def _sweep_if_many_dead(self) -> None:
        """Sweep the dead parents once they outnumber a quarter of the blocks (amortized O(1))."""
        if len(self._dead_parents) > 1024 + (len(self._held) >> 2):
            self._sweep_dead_parents()

    def _orphan_kids(self, bit: int, kids: int | Children) -> bool:
        """A parent of `kids` left worker `bit`: mark the kids `bit` holds as orphans there; True when
        any worker holds one of them (the parent's links must then outlive it)."""
        held = self._held
        orphaned = False
        for kid in kids if isinstance(kids, Children) else (kids,):
            kid_mask = held.get(kid, 0)
            if kid_mask & bit:
                self._mark(kid, bit)
            orphaned = orphaned or bool(kid_mask)
        return orphaned

    def _remove_alone(self, bit: int, hashes: list[int]) -> int:
        """The common case: blocks only this worker held, taken out of `_held` by `remove`, usually
        leaf first, so their links die too."""
        n = len(hashes)
        if not n:
            return 0
        if self._dirty & bit:
            self._unmark_all(bit, hashes)
        children = self._children
        popped = list(map(children.pop, hashes, repeat(None)))
        # a child that is the block listed before it left with it: only the chains' first blocks
        # can have children someone holds
        if popped[1:] == hashes[:-1]:
            starts: Iterable[int] = (0,)
        else:
            starts = compress(range(n), map(ne, popped, [None, *hashes[:-1]]))
        held = self._held
        for j in starts:
            kids = popped[j]
            if kids is None or (not isinstance(kids, Children) and kids not in held):
                continue
            if self._orphan_kids(bit, kids):
                children[hashes[j]] = kids
                self._dead_parents.append(hashes[j])
        self._sweep_if_many_dead()
        return n

    def keys(self) -> list[int]:
        return list(self._held)

    def held_copy(self) -> dict[int, int]:
        """Block -> the bits of the workers holding it: a copy (see `children_copy`)."""
        return self._held.copy()

    def orphans_copy(self) -> dict[int, int]:
        """Block -> the bits of the workers holding it but not its parent: a copy."""
        return self._orphans.copy()

    def children_copy(self) -> dict[int, int | tuple[int, ...]]:
        """The parent -> children links, several children as a tuple: a copy that the index's later
        changes cannot reach (a snapshot is encoded in a thread while the index goes on)."""
        links: dict[int, Any] = dict(self._children)
        several = list(compress(links, map(is_, map(type, links.values()), repeat(Children))))
        links.update(zip(several, map(tuple, map(links.__getitem__, several)), strict=True))
        return links  # no Children left: single children and tuples

    def sweep(self, dead: int, keys: Iterable[int]) -> None:
        """Take the retired worker bits `dead` off these blocks (a slice of a full pass)."""
        held = self._held
        children = self._children
        for h in keys:
            m = held.get(h)
            if m is None or not m & dead:
                continue
            m &= ~dead
            if m:
                held[h] = m
            else:
                del held[h]
                if h in children:
                    self._dead_parents.append(h)

    def forget_bits(self, dead: int) -> None:
        """After a full sweep pass: the retired bits hold nothing, so they have no orphans either."""
        for h in [h for h, m in self._orphans.items() if m & dead]:
            for bit in expand([(self._orphans[h] & dead, 0)]):
                self._unmark(h, bit)
        self._sweep_dead_parents()

    def _sweep_dead_parents(self) -> None:
        held = self._held
        children = self._children
        keep = []
        for p in self._dead_parents:
            kids = children.get(p)
            if p in held or kids is None:
                continue  # back in use, or already dropped
            if any(k in held for k in (kids if isinstance(kids, Children) else (kids,))):
                keep.append(p)
            else:
                del children[p]
        self._dead_parents = keep

    def prefixes(
        self, chain: Sequence[int], mask: int = -1, hints: Sequence[int] = ()
    ) -> list[tuple[int, int]]:
        """(workers mask, matched prefix length) groups for the workers of `mask` holding chain[0], by
        length; `hints` are likely lengths (`bisect_prefixes`)."""
        groups: list[tuple[int, int]] = []
        if not self._held:
            return groups
        get = self._held.get
        dirty = self._dirty & mask
        bisect_prefixes(get, chain, mask & ~dirty, groups, hints)
        if dirty:
            walk_prefixes(get, chain, dirty, groups)
        return groups

    # --- orphan bookkeeping

    def _mark(self, h: int, bit: int) -> None:
        m = self._orphans.get(h, 0)
        if m & bit:
            return
        self._orphans[h] = m | bit
        count = self._orphan_count.get(bit, 0)
        self._orphan_count[bit] = count + 1
        if not count:
            self._dirty |= bit

    def _unmark(self, h: int, bit: int) -> None:
        m = self._orphans.get(h, 0)
        if not m & bit:
            return
        m ^= bit
        if m:
            self._orphans[h] = m
        else:
            del self._orphans[h]
        count = self._orphan_count[bit] - 1
        if count:
            self._orphan_count[bit] = count
        else:
            del self._orphan_count[bit]
            self._dirty &= ~bit

    def _unmark_all(self, bit: int, hashes: list[int]) -> None:
        """`bit` no longer holds `hashes`: none is its orphan any more (the marked ones found in C)."""
        marks = map(self._orphans.get, hashes, repeat(0))
        for h in compress(hashes, map(and_, marks, repeat(bit))):
            self._unmark(h, bit)

    def _adopt_all(self, bit: int, parents: Sequence[int]) -> None:
        """`_adopt` of each parent, the single children's marks looked up in C loops."""
        links = list(map(self._children.get, parents))
        kinds = list(map(type, links))
        one = list(map(is_, kinds, repeat(int)))
        if True in one:
            single = cast("list[int]", list(compress(links, one)))  # the links that are one child
            marks = map(self._orphans.get, single, repeat(0))
            for kid in compress(single, map(and_, marks, repeat(bit))):
                self._unmark(kid, bit)
        if one.count(True) + kinds.count(type(None)) != len(kinds):
            for parent, kids in zip(parents, links, strict=True):
                if kids is not None and type(kids) is not int:
                    self._adopt(parent, bit)

    def _adopt(self, parent: int, bit: int) -> None:
        """`parent` just arrived at worker `bit`: its children there are orphans no more."""
        kids = self._children.get(parent)
        if kids is None:
            return
        for kid in kids if isinstance(kids, Children) else (kids,):
            self._unmark(kid, bit)

    def _link(self, parent: int, kids: int | Children, h: int) -> None:
        held = self._held
        if isinstance(kids, Children):
            if h in kids:
                return
            if len(kids) >= kids.prune_at:
                gone = [k for k in kids if k not in held]
                kids.difference_update(gone)
                # the next pruning waits until the set doubles: a shared prefix (a system prompt) can
                # have thousands of live children, and each new one must not walk them all
                kids.prune_at = max(_CHILDREN_PRUNE_LEN, 2 * len(kids))
            kids.add(h)
        elif kids in held:
            self._children[parent] = Children((kids, h))
        else:
            self._children[parent] = h  # the old child is gone everywhere
