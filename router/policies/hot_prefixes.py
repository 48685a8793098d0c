"""The shared prefixes one-shot traffic keeps coming back to, and the pool's blocks their copies take.

Sessions have live contexts (their next turns come back to them); requests that name no session have hot
prefixes instead: a document, a few-shot prompt, asked about again and again. Every worker holding one
keeps a copy, so the copies of the hot prefixes are what one-shot traffic needs the pool's memory to keep.
While they fit, a further copy costs its prefill and spreads the prefix's traffic; once they do not, a
further copy evicts another hot prefix somewhere, which a later request prefills again.

Each prefix also keeps its requests, each weighed by exp(-age / live_s): at a steady rate that is the
rate x live_s, the requests a copy made now can expect to serve over the next live_s.
"""

from __future__ import annotations

import math
from collections import deque

# hot prefixes remembered (the most recently seen): a bounded cost, and more distinct prefixes than a
# pool of workers could hold copies of
MAX_HOT = 4096


class HotPrefixes:
    """Per prefix (keyed by its deepest block's hash): its blocks, the workers holding it when last
    requested, when that was and its decayed request count; and over those seen within `live_s`, the
    sum of blocks x holders and of blocks."""

    def __init__(self, live_s: float) -> None:
        self.live_s = live_s
        self._prefixes: dict[int, tuple[int, int, float]] = {}  # key -> (blocks, holders, seen at)
        self._requests: dict[int, float] = {}  # key -> its requests, each weighed exp(-age / live_s)
        self._order: deque[tuple[float, int]] = deque()  # (seen at, key), in the order seen
        self.copies = 0  # blocks of every copy of the live prefixes
        self.blocks = 0  # blocks of the live prefixes, one copy of each

    def note(self, key: int, blocks: int, holders: int, now: float) -> None:
        """A request over this prefix, held by `holders` workers, at `now`."""
        self.expire(now)
        requests = self.requests(key, now) + 1.0
        old = self._prefixes.pop(key, None)
        if old is not None:
            self.copies -= old[0] * old[1]
            self.blocks -= old[0]
        elif len(self._prefixes) >= MAX_HOT:
            self._drop(next(iter(self._prefixes)))
        self._prefixes[key] = (blocks, holders, now)
        self._requests[key] = requests
        self._order.append((now, key))
        self.copies += blocks * holders
        self.blocks += blocks

    def requests(self, key: int, now: float) -> float:
        """The prefix's requests, each weighed exp(-its age / live_s); 0 for a prefix not live."""
        entry = self._prefixes.get(key)
        if entry is None:
            return 0.0
        return self._requests[key] * math.exp((entry[2] - now) / self.live_s)

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
        del self._requests[key]
        self.copies -= blocks * holders
        self.blocks -= blocks

    def __len__(self) -> int:
        return len(self._prefixes)
