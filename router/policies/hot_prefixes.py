"""The shared prefixes one-shot traffic keeps coming back to, and the pool's blocks their copies take.

Sessions have live contexts (their next turns come back to them); requests that name no session have hot
prefixes instead: a document, a few-shot prompt, asked about again and again. Every worker holding one
keeps a copy, so the copies of the hot prefixes are what one-shot traffic needs the pool's memory to keep.
While they fit, a further copy costs its prefill and spreads the prefix's traffic; once they do not, a
further copy evicts another hot prefix somewhere, which a later request prefills again.
"""

from __future__ import annotations

from collections import deque

# hot prefixes remembered (the most recently seen): a bounded cost, and more distinct prefixes than a
# pool of workers could hold copies of
MAX_HOT = 4096


class HotPrefixes:
    """Per prefix (keyed by its deepest block's hash): its blocks, the workers holding it when last
    requested and when that was; and the sum of blocks x holders over those seen within `live_s`."""

    def __init__(self, live_s: float) -> None:
        self.live_s = live_s
        self._prefixes: dict[int, tuple[int, int, float]] = {}  # key -> (blocks, holders, seen at)
        self._order: deque[tuple[float, int]] = deque()  # (seen at, key), in the order seen
        self.copies = 0  # blocks of every copy of the live prefixes

    def note(self, key: int, blocks: int, holders: int, now: float) -> None:
        """A request over this prefix, held by `holders` workers, at `now`."""
        self.expire(now)
        old = self._prefixes.pop(key, None)
        if old is not None:
            self.copies -= old[0] * old[1]
        elif len(self._prefixes) >= MAX_HOT:
            self._drop(next(iter(self._prefixes)))
        self._prefixes[key] = (blocks, holders, now)
        self._order.append((now, key))
        self.copies += blocks * holders

    def expire(self, now: float) -> None:
        cutoff = now - self.live_s
        order = self._order
        while order and order[0][0] < cutoff:
            seen, key = order.popleft()
            entry = self._prefixes.get(key)
            if entry is not None and entry[2] == seen:
                self._drop(key)

    def _drop(self, key: int) -> None:
        blocks, holders, _ = self._prefixes.pop(key)
        self.copies -= blocks * holders

    def __len__(self) -> int:
        return len(self._prefixes)
