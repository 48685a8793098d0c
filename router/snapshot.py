"""Snapshots of the router's block index: what a new gateway replica loads instead of replaying the
whole KV event stream.

Per worker: its blocks (as chain runs), and where its event stream stood (epoch, seq); for the whole
index, the JetStream stream sequence of the last KV batch it reflects, so a loader replays only what
came after. Pure: build from a `Router`, apply to a `Router`, encode and decode; no I/O.

A run is a chain: each block's parent is the block before it, the first block's parent is
`parent_hash`. Hashes are packed little-endian uint64 (8 bytes a block instead of ~26 for a msgpack
`CachedBlock`), and a run is applied with one `BlockStored`, which the index stores in C loops: 1M
blocks load in a fraction of a second where one `store` per block takes seconds.

Since version 2 a snapshot also carries the live session table (`SessionSnapshot`: each session's
worker, latest chain, turns, attained service, tool-loop state, think-time estimate), so a new replica
sends an existing session's next turn to the worker holding its KV before any other replica tells it
where that is. Times are stored relative to the snapshot (seconds ago, seconds left), since each
process has its own monotonic clock. Version 1 snapshots (no sessions) still load.
"""

from __future__ import annotations

import array
import math
import operator
import sys
from typing import TYPE_CHECKING

import msgspec

from router.protocol import TIERS, BlockStored, CachedBlock, KvStateDump, ProtocolError, Tier
from router.sessions import Session

if TYPE_CHECKING:
    from router.router import Router

SNAPSHOT_VERSION = 2  # 2: sessions
READABLE_VERSIONS = frozenset({1, 2})
# Session chains exported in all, most recently picked sessions first (16 MB packed; the 1M-block index
# takes 8 MB). A session past the budget keeps its binding and its chain's last block only: enough to
# be recognised by its prompt, not to credit its prefix.
MAX_SESSION_CHAIN_BLOCKS = 1 << 21
_U64 = (1 << 64) - 1
_LITTLE = sys.byteorder == "little"


class ChainRun(msgspec.Struct, array_like=True, frozen=True):
    """Blocks of one tier forming a chain that continues `parent_hash` (None: from a root)."""

    parent_hash: int | None
    tier: Tier
    hashes: bytes  # little-endian uint64, parent before child

    def block_hashes(self) -> list[int]:
        return unpack_hashes(self.hashes)


class WorkerSnapshot(msgspec.Struct, frozen=True):
    worker_id: str
    epoch: int  # the worker process whose events the blocks come from
    seq: int  # its last KV batch reflected
    runs: list[ChainRun]

    def num_blocks(self) -> int:
        return sum(len(run.hashes) // 8 for run in self.runs)

    def blocks(self) -> list[CachedBlock]:
        """The same blocks as `CachedBlock`s (a state dump's shape), parents first within a run."""
        out: list[CachedBlock] = []
        for run in self.runs:
            parent = run.parent_hash
            for h in run.block_hashes():
                out.append(CachedBlock(h, parent, run.tier))
                parent = h
        return out


class SessionSnapshot(msgspec.Struct, array_like=True, frozen=True):
    """One session of the router's table, its times relative to when the snapshot was taken."""

    session_id: str
    worker_id: str
    chain: bytes  # its latest prompt's block hashes, little-endian uint64
    turns: int
    attained_tokens: int
    last_finish_reason: str | None
    think_s: float | None  # EWMA of its tool gaps
    tool_pending: bool  # its latest turn ended in a tool call
    idle_s: float  # since its latest pick
    done_ago_s: float | None  # since its latest completion
    pinned_s: float  # left of the pin on its worker (0: none)
    expires_s: float  # left before the router would forget it


class IndexSnapshot(msgspec.Struct, frozen=True):
    version: int
    stream_seq: int  # JetStream sequence of the last KV batch reflected (0: none)
    created_ts: float  # wall clock, seconds
    source: str  # the replica that took it
    workers: list[WorkerSnapshot]
    sessions: list[SessionSnapshot] = []  # version 2; most recently picked first

    def num_blocks(self) -> int:
        return sum(w.num_blocks() for w in self.workers)


def pack_hashes(hashes: list[int]) -> bytes:
    packed = array.array("Q", hashes)
    if not _LITTLE:
        packed.byteswap()
    return packed.tobytes()


def unpack_hashes(data: bytes) -> list[int]:
    if len(data) % 8:
        raise ProtocolError(f"packed hashes of {len(data)} bytes: not a multiple of 8")
    packed = array.array("Q")
    packed.frombytes(data)
    if not _LITTLE:
        packed.byteswap()
    return packed.tolist()


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(IndexSnapshot)


def encode_snapshot(snapshot: IndexSnapshot) -> bytes:
    return _encoder.encode(snapshot)


def decode_snapshot(data: bytes) -> IndexSnapshot:
    """Raises `ProtocolError` for anything that is not a snapshot this version can apply."""
    try:
        snapshot = _decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"invalid index snapshot: {exc}") from exc
    if snapshot.version not in READABLE_VERSIONS:
        raise ProtocolError(
            f"index snapshot version {snapshot.version}, expected one of {sorted(READABLE_VERSIONS)}"
        )
    for worker in snapshot.workers:
        for run in worker.runs:
            if len(run.hashes) % 8:
                raise ProtocolError(f"worker {worker.worker_id}: a run of {len(run.hashes)} bytes")
    for session in snapshot.sessions:
        if len(session.chain) % 8:
            raise ProtocolError(f"session {session.session_id!r}: a chain of {len(session.chain)} bytes")
    return snapshot


# --- build


class IndexCapture(msgspec.Struct):
    """The index's maps and the workers' stream positions copied at one instant (C-speed dict copies),
    so that the snapshot can be built from them off the event loop while the index moves on."""

    positions: dict[str, tuple[int, int]]
    names: dict[int, str]  # worker bit -> id
    tiers: dict[
        str, tuple[dict[int, int], dict[int, int | tuple[int, ...]], dict[int, int]]
    ]  # held, links, orphans
    sessions: list[tuple] = []  # `session_rows` at `now` (the router's clock)
    now: float = 0.0


# A session's fields as one tuple, in a C loop (about a microsecond a session on the event loop; the
# rest is built on a thread). The chain is the router's own list, which it replaces and never mutates.
_ROW = operator.attrgetter(
    "id",
    "worker_id",
    "chain",
    "turns",
    "attained_tokens",
    "last_finish_reason",
    "think_s",
    "tool_pending",
    "last_pick_at",
    "last_done_at",
    "pinned_until",
    "expires_at",
)


def capture(router: Router, now: float | None = None) -> IndexCapture:
    """Copy what a snapshot needs; the session table only when `now` (the router's clock) is given."""
    index = router.index
    positions = {w: p for w, p in router.stream_positions().items() if index.has_worker(w)}
    tiers: dict[str, tuple[dict[int, int], dict[int, int | tuple[int, ...]], dict[int, int]]] = {
        tier: (t.held_copy(), t.children_copy(), t.orphans_copy())
        for tier, t in index.tiers.items()
        if len(t)
    }
    rows = session_rows(router) if now is not None else []
    return IndexCapture(positions, {index.bit(w): w for w in positions}, tiers, rows, now or 0.0)


def session_rows(router: Router) -> list[tuple]:
    """Every session of the router's table as a tuple of its fields (see `sessions_of`)."""
    return list(map(_ROW, router.sessions.values()))


def sessions_of(
    rows: list[tuple], now: float, budget: int = MAX_SESSION_CHAIN_BLOCKS
) -> list[SessionSnapshot]:
    """The sessions of `rows` bound to a worker and not expired at `now`, most recently picked first,
    their chains packed within `budget` blocks in all (past it, a chain's last block only)."""
    live = [r for r in rows if r[1] is not None and r[11] > now]
    live.sort(key=operator.itemgetter(8), reverse=True)
    out = []
    for sid, worker, chain, turns, attained, finish, think, tool, picked, done, pinned, expires in live:
        kept = chain if len(chain) <= budget else chain[-1:]
        budget = max(0, budget - len(kept))
        try:
            packed = pack_hashes(kept)
        except OverflowError:  # a hash outside uint64 (no xxh3 hash is): no chain to share
            packed = b""
        out.append(
            SessionSnapshot(
                sid,
                worker,
                packed,
                turns,
                attained,
                finish,
                think,
                tool,
                max(0.0, now - picked),
                max(0.0, now - done) if done is not None else None,
                max(0.0, pinned - now),
                expires - now,
            )
        )
    return out


def build_snapshot(
    router: Router, stream_seq: int, created_ts: float, source: str = "", now: float | None = None
) -> IndexSnapshot:
    """The event-fed index of `router` as it stands, said to reflect the stream up to `stream_seq`;
    with `now` (the router's clock), also its live sessions."""
    return snapshot_of(capture(router, now), stream_seq, created_ts, source)


def snapshot_of(
    captured: IndexCapture, stream_seq: int, created_ts: float, source: str = ""
) -> IndexSnapshot:
    """The snapshot of a capture: about a second per million blocks, safe on another thread.

    A block's parent comes from the index's parent -> children links. A block the index marks as an
    orphan (held while its parent is not) whose link is gone gets a parent nobody holds (its hash's
    complement), so that the loader marks it an orphan too and prefix matching stays exact.
    """
    runs: dict[str, list[ChainRun]] = {}
    for tier in TIERS:
        if tier in captured.tiers:
            held, links, orphans = captured.tiers[tier]
            for bit, tier_runs in _tier_runs(held, links, orphans, tier, captured.names).items():
                runs.setdefault(captured.names[bit], []).extend(tier_runs)
    workers = [WorkerSnapshot(w, e, seq, runs.get(w, [])) for w, (e, seq) in captured.positions.items()]
    sessions = sessions_of(captured.sessions, captured.now)
    return IndexSnapshot(SNAPSHOT_VERSION, stream_seq, created_ts, source, workers, sessions)


def _tier_runs(
    held: dict[int, int],
    links: dict[int, int | tuple[int, ...]],
    orphans: dict[int, int],
    tier: Tier,
    names: dict[int, str],
) -> dict[int, list[ChainRun]]:
    """One pass over the held blocks in the index's insertion order, which is chain order for blocks
    stored together: a block extends its worker's current run when its parent ends that run. Runs
    whose parent lands later in the order still load exactly (the index adopts orphans)."""
    if not held:
        return {}
    parent_of = _parents(links)
    wanted = 0
    for bit in names:
        wanted |= bit
    open_runs: dict[int, tuple[int | None, list[int]]] = {}  # bit -> (parent of the run, its blocks)
    out: dict[int, list[ChainRun]] = {}
    for h, mask in held.items():
        mask &= wanted
        parent = parent_of.get(h)
        while mask:
            bit = mask & -mask
            mask ^= bit
            run = open_runs.get(bit)
            if run is not None and parent is not None and run[1][-1] == parent:
                run[1].append(h)
                continue
            if run is not None:
                _close(run, tier, out.setdefault(bit, []))
            start = parent
            if start is None and orphans.get(h, 0) & bit:
                start = h ^ _U64  # a parent this worker does not hold: reloads as an orphan
            open_runs[bit] = (start, [h])
    for bit, run in open_runs.items():
        _close(run, tier, out.setdefault(bit, []))
    return out


def _parents(children: dict[int, int | tuple[int, ...]]) -> dict[int, int]:
    """Invert the parent -> children links (a block hash names its parent: one parent per block)."""
    parent_of = {kids: parent for parent, kids in children.items() if type(kids) is int}
    for parent, kids in children.items():
        if type(kids) is tuple:
            for kid in kids:
                parent_of[kid] = parent
    return parent_of


def _close(run: tuple[int | None, list[int]], tier: Tier, runs: list[ChainRun]) -> None:
    parent, hashes = run
    if parent is not None and not 0 <= parent <= _U64:
        parent = None
    try:
        packed = pack_hashes(hashes)
    except OverflowError:  # a hash outside uint64 (no xxh3 hash is): leave it out
        packed = pack_hashes([h for h in hashes if 0 <= h <= _U64])
    runs.append(ChainRun(parent, tier, packed))


# --- apply


def apply_snapshot(router: Router, snapshot: IndexSnapshot, now: float, age_s: float = 0.0) -> int:
    """Load every worker of the snapshot into `router` (replacing what it held), then its sessions
    (`apply_sessions`; `age_s`: how long ago it was taken); returns blocks loaded.

    Each worker's stream position becomes the snapshot's, so the tail's batches apply in order and
    older ones are ignored. A worker whose runs exceed its index bound is left empty (the router asks
    for its dump on its next batch).
    """
    loaded = 0
    for worker in snapshot.workers:
        if router.approx.has_worker(worker.worker_id):
            continue  # routed without events here: nothing to load
        # room for its blocks until its registration sets the bound from its capacity
        if not router.index.has_worker(worker.worker_id):
            # twice its blocks: the tail may add some before the registration sets the real bound
            bound = max(router.config.index_blocks_per_worker_min, 2 * worker.num_blocks())
            router.index.add_worker(worker.worker_id, bound)
        # an empty dump: its old blocks are cleared and its position set
        router.apply_state_dump(KvStateDump(worker.worker_id, worker.epoch, worker.seq, []), now)
        events = [BlockStored(run.block_hashes(), run.parent_hash, run.tier) for run in worker.runs]
        if router.index.apply(worker.worker_id, events):
            loaded += worker.num_blocks()
    apply_sessions(router, snapshot.sessions, now, age_s)
    return loaded


def apply_sessions(router: Router, sessions: list[SessionSnapshot], now: float, age_s: float = 0.0) -> int:
    """Import sessions taken `age_s` seconds ago into `router`'s table; returns how many.

    Left out: a session expired since, one bound to a worker the router does not have (registered) now,
    one the router already knows (its entry is newer), an id longer than the router accepts. A session
    on a worker without KV events also puts its chain back into that worker's approximate index, as
    routing its latest turn did there (until the same TTL), since nothing else tells where it is.
    """
    age = max(0.0, age_s)
    workers = set(router.workers())
    table = router.sessions
    config = router.config
    restored: list[Session] = []
    for state in sessions:
        expires = min(state.expires_s, config.session_ttl_s) - age  # no longer than it would live here
        if (
            not _finite(state)
            or expires <= 0
            or state.worker_id not in workers
            or state.session_id in table
            or not state.session_id
            or len(state.session_id) > config.max_session_id_len
        ):
            continue
        s = _session(state, now, age, expires, config.pin_max_s)
        if table.restore(s):
            restored.append(s)
    for s in sorted(restored, key=lambda s: s.last_pick_at):  # oldest first: the LRU ends newest
        worker = s.worker_id
        assert worker is not None
        if s.chain and router.approx.has_worker(worker) and now - s.last_pick_at < router.approx.ttl_s:
            router.approx.insert(worker, s.chain, s.last_pick_at)
    return len(restored)


def _finite(state: SessionSnapshot) -> bool:
    # one sum: a NaN or an infinity anywhere makes it non-finite (as do absurd values that overflow)
    return math.isfinite(
        state.idle_s + state.pinned_s + state.expires_s + (state.done_ago_s or 0.0) + (state.think_s or 0.0)
    )


def _session(state: SessionSnapshot, now: float, age: float, expires: float, pin_max_s: float) -> Session:
    s = Session(state.session_id)
    s.worker_id = state.worker_id
    s.chain = unpack_hashes(state.chain)
    s.turns = max(0, state.turns)
    s.attained_tokens = max(0, state.attained_tokens)
    s.last_finish_reason = state.last_finish_reason
    s.think_s = state.think_s if state.think_s is not None and state.think_s >= 0 else None
    s.tool_pending = state.tool_pending
    s.last_pick_at = now - age - max(0.0, state.idle_s)
    if state.done_ago_s is not None:
        s.last_done_at = now - age - max(0.0, state.done_ago_s)
    if state.pinned_s > age:
        s.pinned_until = now + min(state.pinned_s, pin_max_s) - age
    s.expires_at = now + expires
    return s
