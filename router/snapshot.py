"""Snapshots of the router's block index: what a new gateway replica loads instead of replaying the
whole KV event stream.

Per worker: its blocks (as chain runs), and where its event stream stood (epoch, seq); for the whole
index, the JetStream stream sequence of the last KV batch it reflects, so a loader replays only what
came after. Pure: build from a `Router`, apply to a `Router`, encode and decode; no I/O.

A run is a chain: each block's parent is the block before it, the first block's parent is
`parent_hash`. Hashes are packed little-endian uint64 (8 bytes a block instead of ~26 for a msgpack
`CachedBlock`), and a run is applied with one `BlockStored`, which the index stores in C loops: 1M
blocks load in a fraction of a second where one `store` per block takes seconds.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

import msgspec

from router.protocol import TIERS, BlockStored, CachedBlock, KvStateDump, ProtocolError, Tier

if TYPE_CHECKING:
    from router.router import Router

SNAPSHOT_VERSION = 1
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


class IndexSnapshot(msgspec.Struct, frozen=True):
    version: int
    stream_seq: int  # JetStream sequence of the last KV batch reflected (0: none)
    created_ts: float  # wall clock, seconds
    source: str  # the replica that took it
    workers: list[WorkerSnapshot]

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
    if snapshot.version != SNAPSHOT_VERSION:
        raise ProtocolError(f"index snapshot version {snapshot.version}, expected {SNAPSHOT_VERSION}")
    for worker in snapshot.workers:
        for run in worker.runs:
            if len(run.hashes) % 8:
                raise ProtocolError(f"worker {worker.worker_id}: a run of {len(run.hashes)} bytes")
    return snapshot


# --- build


class IndexCapture(msgspec.Struct):
    """The index's maps and the workers' stream positions copied at one instant (C-speed dict copies),
    so that the snapshot can be built from them off the event loop while the index moves on."""

    positions: dict[str, tuple[int, int]]
    names: dict[int, str]  # worker bit -> id
    tiers: dict[
        str, tuple[dict[int, int], dict[int, int | list[int]], dict[int, int]]
    ]  # held, links, orphans


def capture(router: Router) -> IndexCapture:
    index = router.index
    positions = {w: p for w, p in router.stream_positions().items() if index.has_worker(w)}
    tiers = {
        tier: (t._held.copy(), t._children.copy(), t._orphans.copy())
        for tier, t in index.tiers.items()
        if len(t)
    }
    return IndexCapture(positions, {index.bit(w): w for w in positions}, tiers)


def build_snapshot(router: Router, stream_seq: int, created_ts: float, source: str = "") -> IndexSnapshot:
    """The event-fed index of `router` as it stands, said to reflect the stream up to `stream_seq`."""
    return snapshot_of(capture(router), stream_seq, created_ts, source)


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
    return IndexSnapshot(SNAPSHOT_VERSION, stream_seq, created_ts, source, workers)


def _tier_runs(
    held: dict[int, int],
    links: dict[int, int | list[int]],
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


def _parents(children: dict[int, int | list[int]]) -> dict[int, int]:
    """Invert the parent -> children links (a block hash names its parent: one parent per block)."""
    parent_of = {kids: parent for parent, kids in children.items() if type(kids) is int}
    for parent, kids in children.items():
        if type(kids) is list:
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


def apply_snapshot(router: Router, snapshot: IndexSnapshot, now: float) -> int:
    """Load every worker of the snapshot into `router` (replacing what it held); returns blocks loaded.

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
    return loaded


def snapshot_workers(snapshot: IndexSnapshot) -> Iterable[tuple[str, int]]:
    """(worker id, epoch) of every worker in the snapshot."""
    return ((w.worker_id, w.epoch) for w in snapshot.workers)
