"""The contexts of live sessions, per worker: what each worker must keep cached for their next turns.

A session is live on the worker its last turn was picked for, until `live_s` after that pick; its
context is that turn's prompt blocks. `session_kv`'s memory terms charge a worker the prefill of what
its live contexts and a new prompt need beyond a share of its blocks (docs/SESSION_KV.md, "memory(w)").
At most `max_sessions` are kept (the first one recorded goes first). Pure bookkeeping, times passed in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import NamedTuple


class LiveContext(NamedTuple):
    """A live session's context: where its last turn went, that turn's blocks, and when it was picked."""

    worker_id: str
    blocks: int
    picked_at: float


class LiveContexts:
    def __init__(self, live_s: float, max_sessions: int) -> None:
        self.live_s = live_s
        self.max_sessions = max_sessions
        self._contexts: dict[str, LiveContext] = {}  # session -> its context, first recorded first
        self._order: deque[tuple[float, str]] = deque()  # (picked at, session), in pick order
        self._blocks: dict[str, int] = {}  # worker -> blocks of the live contexts there

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._contexts

    def __len__(self) -> int:
        return len(self._contexts)

    def __iter__(self) -> Iterator[str]:
        """The live sessions' ids, first recorded first."""
        return iter(self._contexts)

    def get(self, session_id: str) -> LiveContext | None:
        return self._contexts.get(session_id)

    def blocks_on(self, worker_id: str) -> int:
        """The blocks of the live contexts on `worker_id` (a prefix several share counted per session)."""
        return self._blocks.get(worker_id, 0)

    def picked(self, session_id: str, worker_id: str, blocks: int, now: float) -> None:
        """A turn of `session_id` with `blocks` prompt blocks went to `worker_id`: its context is now
        that, there, replacing the one before."""
        old = self._contexts.get(session_id)
        if old is not None:
            self._blocks[old.worker_id] -= old.blocks
        elif len(self._contexts) >= self.max_sessions:
            self._forget(next(iter(self._contexts)))
        self._contexts[session_id] = LiveContext(worker_id, blocks, now)
        self._blocks[worker_id] = self._blocks.get(worker_id, 0) + blocks
        self._order.append((now, session_id))

    def expire(self, now: float) -> None:
        """Forget the sessions whose last pick is more than `live_s` ago."""
        cutoff = now - self.live_s
        order = self._order
        while order and order[0][0] < cutoff:
            picked_at, session_id = order.popleft()
            context = self._contexts.get(session_id)
            if context is not None and context.picked_at == picked_at:  # not picked again since
                self._forget(session_id)

    def remove_worker(self, worker_id: str) -> None:
        for session_id in [s for s, c in self._contexts.items() if c.worker_id == worker_id]:
            self._forget(session_id)
        self._blocks.pop(worker_id, None)

    def _forget(self, session_id: str) -> None:
        context = self._contexts.pop(session_id)
        self._blocks[context.worker_id] -= context.blocks
