"""Copies of the prefixes one-shot traffic comes back to (documents, few-shot prompts): whether one more
would crowd the pool, and what one is worth to the requests after it (`session_kv`'s
`crowded_prefix_hold` and `copy_value`; docs/EXPERIMENTS.md, ideas 16 and 18).

Sessions have live contexts; one-shot traffic has hot prefixes instead (hot_prefixes.py), and every
worker holding one keeps a copy. While the copies fit, one more costs its prefill and spreads the
prefix's requests; once they do not, it evicts another hot prefix somewhere, prefilled again later.
"""

from __future__ import annotations

from collections.abc import Sequence

from router.config import RouterConfig
from router.policies.base import RouterView
from router.policies.busy_step import BusyStep
from router.policies.hot_prefixes import HotPrefixes

# hot prefixes are keyed at a multiple of this many blocks: requests over one document whose held prefix
# runs a block or two into their questions (that start alike) count as one prefix
HOT_GROUP_BLOCKS = 8


def _keyed_depth(depth: int) -> int:
    return max(1, depth - depth % HOT_GROUP_BLOCKS)


def pool_blocks(view: RouterView) -> tuple[int, int]:
    """The candidates' KV blocks and those their running requests use (their load reports)."""
    loads = view.load.workers
    capacity = in_use = 0
    for w in view.candidates:
        report = loads[w].report
        if report is not None:
            capacity += report.total_blocks
            in_use += report.used_blocks
    return capacity, in_use


class PrefixCopies:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.hot = HotPrefixes(config.live_session_s)

    def note(
        self, view: RouterView, overlap: dict[str, int], chain: Sequence[int], home: str, spared: int
    ) -> bool:
        """Notes the prefix a one-shot request shares with its home and says whether a copy of its
        `spared` blocks would crowd the pool: the copies of the hot prefixes, this one with it, beyond
        the pool's blocks less those in use (where a copy evicts another hot prefix somewhere, as live
        contexts beyond `memory_free_fraction` do); while they fit, a copy costs its own prefill only."""
        depth = _keyed_depth(overlap[home])
        hot = self.hot
        hot.note(chain[depth - 1], depth, sum(1 for n in overlap.values() if n >= depth), view.now)
        if spared <= 0 or not self.config.crowded_prefix_hold:
            return False
        capacity, in_use = pool_blocks(view)
        return hot.copies + spared + in_use > capacity

    def credit(
        self,
        view: RouterView,
        bound: dict[str, float],
        overlap: dict[str, int],
        chain: Sequence[int],
        step: float,
        context: float,
        per_token: float,
    ) -> None:
        """Credits each candidate in `bound` (ms) lacking the request's hot prefix (its home holds at least
        half the prompt) what a copy there is worth over the run: the requests over the prefix expected
        within `live_session_s` (hot_prefixes.py), times the share of them that would find every holder
        busy and the copy idle, busy^holders x (1 - busy) with `busy` the pool's busy share, times the
        wait a busy holder gives now (BusyStep.wait_ms, the least over the holders). At most the copy's
        prefill: a copy is never cheaper than a hit. Only while one copy of every hot prefix on every
        candidate fits beside the blocks the running requests use: then no copy is evicted, and it serves
        for as long as its prefix stays hot (where they do not fit, `note` says the pool is crowded)."""
        home = max(overlap, key=overlap.__getitem__)
        depth = overlap[home]
        if depth * 2 < len(chain):
            return
        depth = _keyed_depth(depth)  # the prefix as `note` keys it
        now = view.now
        hot = self.hot
        later = hot.requests(chain[depth - 1], now)
        if not later:
            return
        candidates = view.candidates
        capacity, in_use = pool_blocks(view)
        if hot.blocks * len(candidates) + in_use > capacity:
            return
        loads = view.load.workers
        wait = float("inf")
        holders = 0
        for w, held in overlap.items():
            if held >= depth:
                wl = loads[w]
                if not wl.requests:
                    return  # an idle holder: the request goes there, and so would the next ones
                holders += 1
                held_wait = BusyStep.wait_ms(wl, now, step, context, per_token)
                if held_wait < wait:
                    wait = held_wait
        busy = sum(1 for w in candidates if loads[w].requests) / len(candidates)
        value = later * busy**holders * (1.0 - busy) * wait
        block_ms = view.block_size * per_token
        for w in candidates:
            lacking = depth - overlap.get(w, 0)
            if lacking > 0 and w in bound:
                copy_ms = lacking * block_ms
                bound[w] -= value if value < copy_ms else copy_ms
