"""The session table: what the router knows about each agent session between its turns.

Bounded in count (`max_sessions`) and in bytes (`max_bytes`, an estimate from above of what each
session holds, its chain mostly); the session closest to expiry, which is the least recently used,
goes first. Expired in time order through a heap of (expires_at, session id) with lazy deletion: a
touch pushes a new entry and leaves the old one, which is skipped when it comes up (its session has
another expiry now, or is gone); the heap is rebuilt when stale entries outnumber the live ones. Two
C-level heap operations per touch where a sorted list's remove and add cost ~3 us. A session is also
findable by the last block of its latest prompt, which is how a request without a session id is
recognised as the next turn of a known session: its prompt extends that chain.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

SESSION_BYTES = 1024  # a Session, its dict and index entries and its id, estimated from above
BYTES_PER_HASH = 8 + 32  # a list slot and the int object (64-bit hashes are not cached small ints)


class Session:
    __slots__ = (
        "attained_tokens",
        "chain",
        "expires_at",
        "id",
        "last_done_at",
        "last_finish_reason",
        "last_pick_at",
        "match_lengths",
        "parent_id",
        "pinned_until",
        "think_s",
        "tool_pending",
        "turn_s",
        "turns",
        "worker_id",
    )

    def __init__(self, session_id: str) -> None:
        self.id = session_id
        self.worker_id: str | None = None
        self.parent_id: str | None = None  # the session that forked this one (sub-agents)
        self.chain: list[int] = []  # block hashes of the latest prompt (the caller's list, not a copy)
        self.match_lengths: tuple[int, ...] = ()  # the index's distinct matches for it: probes to try first
        self.turns = 0
        self.attained_tokens = 0  # service received: prefilled (uncached) plus generated tokens
        self.last_finish_reason: str | None = None
        self.think_s: float | None = None  # EWMA of tool gaps: completion -> next turn's arrival
        self.turn_s: float | None = None  # EWMA of its turns' run times, send -> completion (room queue)
        self.last_pick_at = float("-inf")
        self.last_done_at: float | None = None
        self.tool_pending = False  # the latest turn ended in a tool call
        self.pinned_until = float("-inf")  # its worker was asked to keep its blocks until then
        self.expires_at = 0.0


class SessionTable:
    def __init__(self, max_sessions: int, ttl_s: float, max_bytes: int = 256 << 20) -> None:
        if max_sessions < 1 or max_bytes < 1:
            raise ValueError("max_sessions and max_bytes must be at least 1")
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes
        self.bytes = 0  # the estimate of what the sessions hold, kept under max_bytes
        self.ttl_s = ttl_s
        self._sessions: dict[str, Session] = {}
        self._by_expiry: list[tuple[float, str]] = []  # a heap of (expires_at, session id), stale ones too
        self._by_tail: dict[int, str] = {}  # last block hash of a session's chain -> session id

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def touch(self, session_id: str, now: float) -> Session:
        """The session, created if new, with its expiry pushed to `now + ttl_s`."""
        s = self._sessions.get(session_id)
        if s is None:
            while len(self._sessions) >= self.max_sessions or self.bytes + SESSION_BYTES > self.max_bytes:
                if not self._sessions:
                    break
                self._drop(self._oldest())
            s = self._sessions[session_id] = Session(session_id)
            self.bytes += SESSION_BYTES
        s.expires_at = now + self.ttl_s
        self._push(s)
        return s

    def set_chain(self, s: Session, chain: Sequence[int]) -> None:
        if s.chain and self._by_tail.get(s.chain[-1]) == s.id:
            del self._by_tail[s.chain[-1]]
        self.bytes += (len(chain) - len(s.chain)) * BYTES_PER_HASH
        s.chain = chain if isinstance(chain, list) else list(chain)  # kept, not copied: 2,048 blocks
        if s.chain:
            self._by_tail[s.chain[-1]] = s.id
        while self.bytes > self.max_bytes and len(self._sessions) > 1:  # the others go first
            self._drop(self._oldest(other_than=s.id))
        if self.bytes > self.max_bytes:  # one chain alone over the cap: the session keeps no chain
            self.set_chain(s, [])

    def values(self) -> list[Session]:
        """Every session kept (expired ones not yet swept included), in no particular order."""
        return list(self._sessions.values())

    def restore(self, s: Session) -> bool:
        """Add a session as another router kept it (a snapshot), its expiry and chain included.

        False when the id is known here already (the live entry is newer than any snapshot), or the
        table is full of sessions that outlive it (it would be the first to go anyway)."""
        if s.id in self._sessions:
            return False
        if len(self._sessions) >= self.max_sessions:
            oldest = self._oldest()
            if s.expires_at <= self._sessions[oldest].expires_at:
                return False
            self._drop(oldest)
        size = SESSION_BYTES + len(s.chain) * BYTES_PER_HASH
        if self.bytes + size > self.max_bytes:
            return False  # what is live here stays; a snapshot's session is only a hint
        self._sessions[s.id] = s
        self.bytes += size
        self._push(s)
        if s.chain:
            self._by_tail.setdefault(s.chain[-1], s.id)  # a live session's claim on the tail stands
        return True

    def find_by_chain(self, chain: Sequence[int]) -> str | None:
        """The session whose latest prompt this chain extends (the longest such prompt), if any."""
        tail = self._by_tail
        if not tail:
            return None
        return next(filter(None, map(tail.get, reversed(chain))), None)  # a C loop: ~20 ns a block

    def expire(self, now: float) -> int:
        dropped = 0
        by_expiry = self._by_expiry
        while by_expiry and by_expiry[0][0] <= now:
            expires_at, session_id = heapq.heappop(by_expiry)
            s = self._sessions.get(session_id)
            if s is not None and s.expires_at == expires_at:  # else a stale entry
                self._drop(session_id)
                dropped += 1
        return dropped

    def discard(self, session_id: str) -> None:
        if session_id in self._sessions:
            self._drop(session_id)

    def _push(self, s: Session) -> None:
        by_expiry = self._by_expiry
        heapq.heappush(by_expiry, (s.expires_at, s.id))
        if len(by_expiry) > 2 * len(self._sessions) + 64:  # mostly stale: rebuilt from the live ones
            self._by_expiry = [(live.expires_at, live.id) for live in self._sessions.values()]
            heapq.heapify(self._by_expiry)

    def _oldest(self, other_than: str | None = None) -> str:
        """The live session closest to expiry (ties: the smaller id), other than `other_than`."""
        by_expiry = self._by_expiry
        kept: list[tuple[float, str]] = []  # `other_than`'s entries (one per touch at the same time)
        while True:
            expires_at, session_id = by_expiry[0]
            s = self._sessions.get(session_id)
            if s is None or s.expires_at != expires_at:
                heapq.heappop(by_expiry)  # stale
            elif session_id == other_than:
                kept.append(heapq.heappop(by_expiry))
            else:
                break
        for entry in kept:
            heapq.heappush(by_expiry, entry)
        return session_id

    def _drop(self, session_id: str) -> None:
        s = self._sessions.pop(session_id)  # its heap entries go stale
        self.bytes -= SESSION_BYTES + len(s.chain) * BYTES_PER_HASH
        if s.chain and self._by_tail.get(s.chain[-1]) == session_id:
            del self._by_tail[s.chain[-1]]
