"""The policy interface: `pick(request, view) -> Decision`, and the view of the router a policy reads."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Container, Sequence
from typing import ClassVar

from router.approx_index import ApproxIndex
from router.config import RouterConfig
from router.index import BlockIndex
from router.load import LoadView
from router.protocol import Tier
from router.request import Decision, RouteRequest
from router.sessions import Session

MATCH_HINTS = 4  # a session's distinct match lengths kept as probes (the longest)


class RouterView:
    """What one pick may read: the candidate workers, the indexes, the load and the request's session.

    Built per pick; `overlap` is computed once and shared by whatever the policy asks for. It leaves
    the session its matches' lengths, the probes its next turn's `overlap` tries first.
    """

    __slots__ = (
        "_overlap",
        "_reach",
        "approx",
        "block_size",
        "candidates",
        "held",
        "held_for",
        "index",
        "load",
        "now",
        "parent",
        "session",
        "yielding",
    )

    def __init__(
        self,
        candidates: Sequence[str],
        index: BlockIndex,
        approx: ApproxIndex,
        load: LoadView,
        session: Session | None,
        block_size: int,
        now: float,
        parent: Session | None = None,
        yielding: frozenset[str] = frozenset(),
        held: Container[str] = frozenset(),
        held_for: Collection[str] = frozenset(),
    ) -> None:
        self.candidates = candidates  # routable, in a stable order; never empty
        self.index = index
        self.approx = approx
        self.load = load
        self.session = session
        self.parent = parent  # a new session's parent (it forked this one), when known
        self.block_size = block_size
        self.now = now
        self._overlap: dict[str, int] | None = None
        self._reach: dict[Tier, dict[str, int]] = {}
        # workers whose running decodes yield to a prompt that does not fit (the router sends them
        # apart, at a priority every prompt outranks: Router.decode_priority)
        self.yielding = yielding
        # picks held at the router (RouterConfig.memory_hold): recorded in the load, not at the worker
        self.held = held
        self.held_for = held_for  # the workers those picks wait for: jammed for device memory

    def preset_overlap(self, found: dict[str, int]) -> None:
        """Use this match (read earlier, as a queued request's in Dynamo) instead of the index's now."""
        self._overlap = found

    def overlap(self, chain: Sequence[int]) -> dict[str, int]:
        """Device-tier matched prefix in blocks per worker (event-fed, or approximate for silent workers)."""
        if self._overlap is None:
            session = self.session
            if session is None:
                found = self.index.overlap(chain)
            else:
                # a turn extends the session's last prompt, so the last matches and that prompt's end
                # are where the boundaries most likely are: probed first, a few lookups instead of ~22
                hints = (*session.match_lengths, len(session.chain))
                found = self.index.overlap(chain, "device", hints)
                session.match_lengths = tuple(sorted(set(found.values()))[-MATCH_HINTS:])
            if len(self.approx):
                found.update(self.approx.overlap(chain))
            self._overlap = found
        return self._overlap

    def tier_overlap(self, chain: Sequence[int], tier: Tier) -> dict[str, int]:
        """The prefix per worker held on the device or on `tier` (`BlockIndex.reach`): what the worker
        serves without computing, at `tier`'s onboarding cost for the part past `overlap(chain)`.
        Empty while no worker reports blocks on `tier`. Computed once per tier, as `overlap`: `chain`
        is the request's."""
        found = self._reach.get(tier)
        if found is None:
            found = self._reach[tier] = self.index.reach(chain, tier)
        return found


class Policy(ABC):
    name: ClassVar[str]

    def __init__(self, config: RouterConfig, rng: random.Random) -> None:
        self.config = config
        self.rng = rng

    @abstractmethod
    def pick(self, request: RouteRequest, view: RouterView) -> Decision: ...

    def on_pick(
        self, request: RouteRequest, decision: Decision, block_size: int, now: float, one_shot: bool
    ) -> None:
        """A pick was made (by this router or, recorded, by a replica): track it if the policy does.
        `one_shot`: the request continues no session (`router.request.is_one_shot`)."""
        return None

    def on_first_token(self, request_id: str) -> None:
        return None

    def memory_wait_ms(self, chain: Sequence[int], worker_id: str, view: RouterView) -> float:
        """The predicted wait of a prompt of `chain` for device memory on `worker_id` (ms), for the
        router's memory hold; 0 for a policy that does not predict it."""
        return 0.0

    def memory_waits(self, worker_id: str, view: RouterView) -> Callable[[Sequence[int]], float]:
        """`memory_wait_ms` on `worker_id` for any prompt, in one state (`view`): a pass over the
        picks held for it, where a policy can walk the worker's requests once."""
        return lambda chain: self.memory_wait_ms(chain, worker_id, view)

    def on_complete(self, request_id: str) -> None:
        return None

    def on_end(self, request_id: str, now: float) -> None:
        """The request's stream ended at `now` (completed, failed or given up), after `on_complete`."""
        return None

    def on_workers_changed(self, workers: Sequence[str]) -> None:
        """The routable set changed (consistent hashing rebuilds its ring here)."""
        return None

    def remove_worker(self, worker_id: str) -> None:
        """Forget per-worker state."""
        return None

    def expire(self, now: float) -> None:
        """Drop TTL'd state."""
        return None
