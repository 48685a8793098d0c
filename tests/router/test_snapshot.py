"""Index snapshots: a router loaded from a snapshot answers every prefix query like the one it was taken
from, on random event streams (branching chains, removals out of order, orphans, tiers), and keeps
answering alike when the stream's tail is applied to both."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router.protocol import (
    TIERS,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    CachedBlock,
    KvEvent,
    KvEventBatch,
    ProtocolError,
    WorkerRegistration,
)
from router.router import Router
from router.snapshot import (
    SNAPSHOT_VERSION,
    ChainRun,
    IndexSnapshot,
    WorkerSnapshot,
    apply_snapshot,
    build_snapshot,
    decode_snapshot,
    encode_snapshot,
    pack_hashes,
    unpack_hashes,
)

WORKERS = ("a", "b", "c")


def registration(worker_id: str, epoch: int = 1) -> WorkerRegistration:
    return WorkerRegistration(worker_id, "http://w", "m", 16, 4096, "mock", epoch, 0.0)


class Model:
    """Ground truth: which (block, tier) each worker holds."""

    def __init__(self) -> None:
        self.held: dict[tuple[str, str], set[int]] = {}

    def apply(self, worker: str, events: list[KvEvent]) -> None:
        for event in events:
            if isinstance(event, BlockStored):
                self.held.setdefault((worker, event.tier), set()).update(event.block_hashes)
            elif isinstance(event, BlockRemoved):
                self.held.setdefault((worker, event.tier), set()).difference_update(event.block_hashes)
            else:
                for tier in TIERS:
                    self.held.pop((worker, tier), None)

    def overlap(self, chain: list[int], tier: str) -> dict[str, int]:
        out = {}
        for worker in WORKERS:
            blocks = self.held.get((worker, tier), set())
            n = 0
            while n < len(chain) and chain[n] in blocks:
                n += 1
            if n:
                out[worker] = n
        return out


class Stream:
    """Random KV events over a forest of blocks whose parents are fixed (as the chained hash fixes them)."""

    def __init__(self, rng: random.Random, nodes: int) -> None:
        self.rng = rng
        self.parents: list[int | None] = [None]
        for i in range(1, nodes):
            self.parents.append(None if rng.random() < 0.15 else rng.randrange(i))
        self.seq = dict.fromkeys(WORKERS, -1)

    def hash(self, node: int) -> int:
        return (node * 0x9E3779B97F4A7C15 + 12345) & ((1 << 64) - 1)  # spread over all 64 bits

    def chain(self, node: int) -> list[int]:
        out = []
        cur: int | None = node
        while cur is not None:
            out.append(self.hash(cur))
            cur = self.parents[cur]
        return out[::-1]

    def events(self) -> list[KvEvent]:
        rng = self.rng
        tier = rng.choice(TIERS) if rng.random() < 0.3 else "device"
        chain = self.chain(rng.randrange(len(self.parents)))
        kind = rng.random()
        if kind < 0.55:  # store a stretch of the chain, sometimes without its start (an orphan run)
            start = rng.randrange(len(chain)) if rng.random() < 0.3 else 0
            parent = chain[start - 1] if start else None
            return [BlockStored(chain[start:], parent, tier)]
        if kind < 0.95:  # remove some blocks, in any order
            picked = rng.sample(chain, rng.randint(1, len(chain)))
            return [BlockRemoved(picked, tier)]
        return [AllBlocksCleared()]

    def batch(self, worker: str, events: list[KvEvent]) -> KvEventBatch:
        self.seq[worker] += 1
        return KvEventBatch(worker, 1, self.seq[worker], 0.0, events)


def routers_agree(stream: Stream, model: Model, *routers: Router) -> None:
    for node in range(len(stream.parents)):
        chain = stream.chain(node)
        for tier in TIERS:
            expected = model.overlap(chain, tier)
            for router in routers:
                assert router.index.overlap(chain, tier) == expected, (node, tier)


def fed_router() -> Router:
    router = Router()
    for w in WORKERS:
        router.add_worker(registration(w), 0.0)
    return router


def run(seed: int, nodes: int, before: int, after: int) -> None:
    rng = random.Random(seed)
    stream = Stream(rng, nodes)
    model = Model()
    old = fed_router()
    for _ in range(before):
        worker = rng.choice(WORKERS)
        events = stream.events()
        model.apply(worker, events)
        assert old.apply_kv_batch(stream.batch(worker, events), 0.0)

    snapshot = decode_snapshot(encode_snapshot(build_snapshot(old, 77, 1.0, "old")))
    assert snapshot.stream_seq == 77 and snapshot.source == "old"
    new = Router()
    apply_snapshot(new, snapshot, 0.0)
    for w in WORKERS:
        new.add_worker(registration(w), 0.0)  # the registry arrives after the snapshot
    assert new.stream_positions() == old.stream_positions()
    routers_agree(stream, model, old, new)

    for _ in range(after):  # the tail: both routers must keep agreeing with the model
        worker = rng.choice(WORKERS)
        events = stream.events()
        model.apply(worker, events)
        batch = stream.batch(worker, events)
        assert old.apply_kv_batch(batch, 0.0)
        assert new.apply_kv_batch(batch, 0.0)
    routers_agree(stream, model, old, new)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32), st.integers(2, 40), st.integers(0, 80), st.integers(0, 40))
def test_snapshot_then_tail_matches_the_model(seed: int, nodes: int, before: int, after: int) -> None:
    run(seed, nodes, before, after)


def test_larger_streams() -> None:
    for seed in range(4):
        run(seed, 300, 600, 300)


def test_blocks_and_runs() -> None:
    router = fed_router()
    events: list[KvEvent] = [BlockStored([1, 2, 3], None), BlockStored([4], 2), BlockStored([9], 8, "host")]
    router.apply_kv_batch(KvEventBatch("a", 5, 0, 0.0, events), 0.0)
    snapshot = build_snapshot(router, 3, 0.0)
    (worker,) = [w for w in snapshot.workers if w.worker_id == "a"]
    assert (worker.epoch, worker.seq) == (5, 0)
    assert worker.num_blocks() == snapshot.num_blocks() == 5
    blocks = set(worker.blocks())
    assert blocks == {
        CachedBlock(1, None),
        CachedBlock(2, 1),
        CachedBlock(3, 2),
        CachedBlock(4, 2),
        CachedBlock(9, 8, "host"),  # stored under a parent it does not hold: stays an orphan
    }


def test_a_worker_restarted_since_the_snapshot_starts_empty() -> None:
    old = fed_router()
    old.apply_kv_batch(KvEventBatch("a", 1, 0, 0.0, [BlockStored([1, 2], None)]), 0.0)
    new = Router()
    apply_snapshot(new, build_snapshot(old, 1, 0.0), 0.0)
    assert new.index.overlap([1, 2]) == {"a": 2}
    # the worker's new process publishes from seq 0 of a new epoch: its old blocks go
    assert new.apply_kv_batch(KvEventBatch("a", 2, 0, 0.0, [BlockStored([5], None)]), 0.0)
    assert new.index.overlap([1, 2]) == {}
    assert new.index.overlap([5]) == {"a": 1}


def test_tail_batches_already_in_the_snapshot_are_ignored() -> None:
    old = fed_router()
    batches = [
        KvEventBatch("a", 1, 0, 0.0, [BlockStored([1, 2], None)]),
        KvEventBatch("a", 1, 1, 0.0, [BlockRemoved([2])]),
    ]
    for batch in batches:
        old.apply_kv_batch(batch, 0.0)
    new = Router()
    apply_snapshot(new, build_snapshot(old, 2, 0.0), 0.0)
    for batch in batches:  # a tail that starts too early replays them: no effect, no gap
        assert new.apply_kv_batch(batch, 0.0)
    assert new.index.overlap([1, 2]) == {"a": 1}
    assert new.apply_kv_batch(KvEventBatch("a", 1, 2, 0.0, [BlockStored([2], 1)]), 0.0)
    assert new.index.overlap([1, 2]) == {"a": 2}
    assert not new.apply_kv_batch(KvEventBatch("a", 1, 5, 0.0, []), 0.0)  # a gap: ask for a dump


def test_pack_roundtrip_and_full_range() -> None:
    hashes = [0, 1, (1 << 64) - 1, 1 << 63, 0xDEADBEEF]
    assert unpack_hashes(pack_hashes(hashes)) == hashes
    assert len(pack_hashes(hashes)) == 8 * len(hashes)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00\x01garbage",
        encode_snapshot(IndexSnapshot(SNAPSHOT_VERSION + 1, 0, 0.0, "x", [])),
        encode_snapshot(
            IndexSnapshot(
                SNAPSHOT_VERSION, 0, 0.0, "x", [WorkerSnapshot("a", 1, 0, [ChainRun(None, "device", b"123")])]
            )
        ),
    ],
)
def test_bad_snapshots_raise_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_snapshot(data)
