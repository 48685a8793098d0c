"""Trace rows as simulated turns: open-loop rows at their timestamp, session turns closed-loop.

A session's turn 0 arrives at its timestamp; every later turn arrives `delay_ms` (capped) after the
previous turn of the same session finished, so a slow policy also slows its sessions down, as real
agents are slowed down.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from loadgen.trace import TRACE_BLOCK_SIZE, TraceBlockHasher, TraceContent, TraceRow


class FastTraceContent(TraceContent):
    """Trace tokens drawn from SHAKE-128 of the id: ~10x cheaper than `random.Random` per id.

    The simulator never sends tokens anywhere, it only needs every id to map to the same tokens (and
    so the same chained block hashes) everywhere in one run; hashing 180k distinct ids of a trace
    must take a second, not twenty.
    """

    def tokens_for_id(self, hash_id: int) -> list[int]:
        return self._tokens(hash_id).tolist()

    def token_bytes_for_id(self, hash_id: int) -> bytes:
        # straight from the array, no 512 Python ints in between: a third of the cost per id
        return self._tokens(hash_id).astype("<u4").tobytes()

    def _tokens(self, hash_id: int) -> np.ndarray:
        key = f"{self.seed}:{hash_id}".encode()
        raw = np.frombuffer(hashlib.shake_128(key).digest(4 * self.trace_block_size), dtype="=u4")
        return raw % self.vocab_size  # in C: 180k ids x 512 tokens on a big trace


def parent_of(session_id: str | None) -> str | None:
    """The parent of a sub-agent session, which the Claude Code traces name `<parent>/sub<N>` (a client
    would send it as a parent-session header); None for other sessions."""
    if session_id is None or "/sub" not in session_id:
        return None
    return session_id.rsplit("/sub", 1)[0]


class Turn:
    """One request of the replay: a trace row, its session and its place in the session."""

    __slots__ = ("arrival", "index", "request_id", "row", "session", "tool_result", "turn")

    def __init__(self, index: int, row: TraceRow, session: str, turn: int, tool_result: bool) -> None:
        self.index = index
        self.row = row
        self.session = session
        self.turn = turn
        self.tool_result = tool_result  # its predecessor ended in a tool call
        self.request_id = f"r{index}"
        self.arrival = -1.0  # virtual time it was sent (set by the replay)


class Workload:
    """The turns of a trace grouped into sessions, with arrival times in virtual seconds.

    Rows without a session id are sessions of one turn (open loop). `rate_scale` > 1 compresses time:
    timestamps and think times are divided by it.
    """

    def __init__(
        self,
        rows: Sequence[TraceRow],
        *,
        block_size: int = 64,
        trace_block_size: int = TRACE_BLOCK_SIZE,
        max_think_s: float = 60.0,
        rate_scale: float = 1.0,
        seed: int = 0,
        hasher: TraceBlockHasher | None = None,
    ) -> None:
        if rate_scale <= 0:
            raise ValueError("rate_scale must be positive")
        if max_think_s < 0:
            raise ValueError("max_think_s must not be negative")
        self.rows = list(rows)
        self.block_size = block_size
        self.max_think_s = max_think_s
        self.rate_scale = rate_scale
        self.hasher = hasher or TraceBlockHasher(
            FastTraceContent(trace_block_size=trace_block_size, seed=seed), block_size=block_size
        )
        self.sessions: dict[str, list[TraceRow]] = {}
        for position, row in enumerate(self.rows):
            key = row.session_id if row.session_id is not None else f"row-{position}"
            self.sessions.setdefault(key, []).append(row)
        for turns in self.sessions.values():
            turns.sort(key=lambda r: (r.turn, r.timestamp))
        self.t0 = min((row.timestamp for row in self.rows), default=0.0)
        # each row's chain, by the row's identity (rows live as long as the workload): every policy's
        # replay asks for every row once, and joining ~250 per-id lists into a 2,000-block chain costs
        # more than keeping it (forked replays share the one hashed in the parent)
        self._chains: dict[int, tuple[TraceRow, list[int]]] = {}

    def __len__(self) -> int:
        return len(self.rows)

    def start_time(self, row: TraceRow) -> float:
        return (row.timestamp - self.t0) / 1000.0 / self.rate_scale

    def think_time(self, row: TraceRow) -> float:
        return min(row.delay_ms / 1000.0, self.max_think_s) / self.rate_scale

    def block_hashes(self, row: TraceRow) -> list[int]:
        """The row's full-block chain: shared, not a copy (callers must not change it)."""
        kept = self._chains.get(id(row))
        if kept is None or kept[0] is not row:  # a row of another workload may reuse a dead one's id
            kept = self._chains[id(row)] = (row, self.hasher.block_hashes(row))
        return kept[1]

    def hash_all(self) -> None:
        """Every row's chain, now (before forking replays that would each hash them again)."""
        for row in self.rows:
            self.block_hashes(row)

    def first_turns(self) -> list[tuple[float, str, TraceRow]]:
        """(arrival time, session, row) of every session's first turn, in arrival order."""
        firsts = [(self.start_time(turns[0]), key, turns[0]) for key, turns in self.sessions.items()]
        firsts.sort(key=lambda item: (item[0], item[1]))
        return firsts

    def arrival_order(self) -> list[TraceRow]:
        """Rows in the order an uncontended replay would send them (for the oracle)."""
        return sorted(self.rows, key=lambda r: r.timestamp)
