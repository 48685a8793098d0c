"""Index snapshots: a router loaded from a snapshot answers every prefix query like the one it was taken
from, on random event streams (branching chains, removals out of order, orphans, tiers), and keeps
answering alike when the stream's tail is applied to both."""

from __future__ import annotations

import random

import msgspec
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
from router.request import RouteRequest
from router.router import Router
from router.snapshot import (
    SNAPSHOT_VERSION,
    ChainRun,
    IndexSnapshot,
    SessionSnapshot,
    WorkerSnapshot,
    apply_sessions,
    apply_snapshot,
    build_snapshot,
    decode_snapshot,
    encode_snapshot,
    pack_hashes,
    session_rows,
    sessions_of,
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


# --- sessions (snapshot version 2)


class SnapshotV1(msgspec.Struct, frozen=True):
    """The layout written before sessions were added."""

    version: int
    stream_seq: int
    created_ts: float
    source: str
    workers: list[WorkerSnapshot]


def approx_router(*workers: str) -> Router:
    """Workers without KV events: where a session's KV lives is known only from routing it."""
    router = Router()
    for w in workers:
        router.add_worker(
            WorkerRegistration(w, "http://w", "m", 16, 4096, "mock", 1, 0.0, publishes_events=False), 0.0
        )
    return router


def turn(router: Router, rid: str, session: str, chain: list[int], now: float, reason: str = "stop") -> str:
    """One turn of `session`: picked at `now`, done a second later; returns its worker."""
    decision = router.pick(RouteRequest(rid, "m", chain, len(chain) * 16, session, 8), now)
    router.on_first_token(rid, now + 0.5)
    router.on_complete(rid, now + 1.0, reason, 8)
    return decision.worker_id


def relative(router: Router, now: float) -> dict[str, tuple]:
    """Each session's state with its times as seconds before/after `now` (what a snapshot keeps)."""
    out = {}
    for s in router.sessions.values():
        done = None if s.last_done_at is None else round(now - s.last_done_at, 6)
        pinned = round(max(0.0, s.pinned_until - now), 6)
        out[s.id] = (
            s.worker_id,
            list(s.chain),
            s.turns,
            s.attained_tokens,
            s.last_finish_reason,
            None if s.think_s is None else round(s.think_s, 6),
            s.tool_pending,
            round(now - s.last_pick_at, 6),
            done,
            pinned,
            round(s.expires_at - now, 6),
        )
    return out


def two_sessions(router: Router) -> dict[str, list[int]]:
    """An agent's tool loop (pinned, its think time learnt) and a chat, sharing a system prompt, on
    different workers: the chat's first turn came while the agent's was still prefilling."""
    system = list(range(1, 33))
    chains = {"agent": [*system, *range(40, 49)], "chat": [*system, *range(1000, 1006)]}
    first = RouteRequest("a1", "m", chains["agent"], len(chains["agent"]) * 16, "agent", 8)
    router.pick(first, 10.0)
    turn(router, "c1", "chat", chains["chat"], 10.1)
    router.on_complete("a1", 11.0, "tool_calls", 8)
    chains["agent"] = [*chains["agent"], 50, 51, 52]
    turn(router, "a2", "agent", chains["agent"], 14.0, "tool_calls")  # a 3 s tool gap
    return chains


def test_sessions_round_trip() -> None:
    old = approx_router("w0", "w1")
    two_sessions(old)
    assert {s.worker_id for s in old.sessions.values()} == {"w0", "w1"}
    snapshot = decode_snapshot(encode_snapshot(build_snapshot(old, 0, 1000.0, "old", now=16.0)))
    assert snapshot.version == SNAPSHOT_VERSION == 2
    assert [s.session_id for s in snapshot.sessions] == ["agent", "chat"]  # most recently picked first

    new = approx_router("w0", "w1")
    assert apply_snapshot(new, snapshot, 500.0, age_s=2.0) == 0  # no event-fed blocks, two sessions
    # the same state on the new router's own clock, two seconds on (the snapshot's age)
    assert relative(new, 500.0) == relative(old, 18.0)
    agent = new.sessions.get("agent")
    assert agent is not None and agent.think_s == pytest.approx(3.0) and agent.turns == 2
    assert agent.tool_pending and agent.pinned_until > 500.0
    # a prompt without a session id that extends a session's chain is that session here too
    assert new.resolve_session(None, [*old.sessions.get("chat").chain, 7]) == "chat"  # type: ignore[union-attr]


def test_restored_sessions_route_like_the_old_router() -> None:
    old = approx_router("w0", "w1")
    chains = two_sessions(old)
    snapshot = decode_snapshot(encode_snapshot(build_snapshot(old, 0, 0.0, now=16.0)))
    control = approx_router("w0", "w1")  # what a replica learns without the sessions (version 1)
    new = approx_router("w0", "w1")
    apply_snapshot(new, snapshot, 16.0)
    picks = {}
    for router in (old, new, control):
        picks[id(router)] = [
            turn(router, f"{sid}-next", sid, [*chains[sid], 9000 + i], 17.0) for i, sid in enumerate(chains)
        ]
    assert picks[id(new)] == picks[id(old)] == [old.sessions.get(s).worker_id for s in chains]  # type: ignore[union-attr]
    assert picks[id(control)] != picks[id(old)]  # the index alone does not tell


def test_expired_sessions_are_not_exported_nor_imported() -> None:
    router = approx_router("w0", "w1")
    two_sessions(router)
    ttl = router.config.session_ttl_s
    # "chat" was last picked at 10.1, "agent" at 14: at 14 + ttl - 1 the chat has expired (not swept)
    snapshot = build_snapshot(router, 0, 0.0, now=13.0 + ttl)
    assert [s.session_id for s in snapshot.sessions] == ["agent"]
    assert build_snapshot(router, 0, 0.0).sessions == []  # without the router's clock: no sessions
    # and one that expires while the snapshot waits for its loader is left out too
    new = approx_router("w0", "w1")
    apply_snapshot(new, snapshot, 0.0, age_s=1.0)
    assert len(new.sessions) == 0


def test_a_binding_to_a_worker_not_in_the_view_is_dropped() -> None:
    old = approx_router("w0", "w1")
    two_sessions(old)
    on_w1 = {s.id for s in old.sessions.values() if s.worker_id == "w1"}
    snapshot = build_snapshot(old, 0, 0.0, now=16.0)
    new = approx_router("w0", "w2")  # w1 is gone
    apply_snapshot(new, snapshot, 16.0)
    assert {s.id for s in new.sessions.values()} == {s.id for s in old.sessions.values()} - on_w1
    assert all(s.worker_id == "w0" for s in new.sessions.values())
    assert new.approx.blocks_of("w2") == 0


def test_a_session_the_router_knows_already_is_kept() -> None:
    old = approx_router("w0", "w1")
    two_sessions(old)
    snapshot = build_snapshot(old, 0, 0.0, now=16.0)
    new = approx_router("w0", "w1")
    # a route note of another replica taught it the agent session's newer turn meanwhile
    worker = turn(new, "n1", "agent", [777, 778], 15.5)
    apply_snapshot(new, snapshot, 16.0)
    agent = new.sessions.get("agent")
    assert agent is not None and agent.chain == [777, 778] and agent.worker_id == worker
    assert agent.turns == 1 and "chat" in new.sessions


def test_session_chains_are_bounded() -> None:
    router = approx_router("w0")
    for i in range(5):
        turn(router, f"r{i}", f"s{i}", [i * 100 + j for j in range(10)], float(i))
    sessions = sessions_of(session_rows(router), 10.0, budget=25)
    # most recent first: s4 and s3 whole (20 blocks), then only the last block of each
    assert [len(s.chain) // 8 for s in sessions] == [10, 10, 1, 1, 1]
    assert [unpack_hashes(s.chain)[-1] for s in sessions] == [409, 309, 209, 109, 9]
    new = approx_router("w0")
    assert apply_sessions(new, sessions, 10.0) == 5
    assert new.resolve_session(None, [200 + j for j in range(10)] + [5]) == "s2"  # still recognised


def test_an_old_snapshot_without_sessions_loads() -> None:
    old = fed_router()
    old.apply_kv_batch(KvEventBatch("a", 1, 0, 0.0, [BlockStored([1, 2], None)]), 0.0)
    current = build_snapshot(old, 4, 0.0, "old")
    data = msgspec.msgpack.encode(SnapshotV1(1, 4, 0.0, "old", current.workers))
    snapshot = decode_snapshot(data)
    assert snapshot.version == 1 and snapshot.sessions == []
    new = fed_router()
    assert apply_snapshot(new, snapshot, 0.0) == 2
    assert new.index.overlap([1, 2]) == {"a": 2} and len(new.sessions) == 0


@pytest.mark.parametrize(
    "bad",
    [
        {"idle_s": float("nan")},
        {"expires_s": float("inf")},
        {"think_s": float("-inf")},
        {"worker_id": "nobody"},
        {"session_id": ""},
        {"session_id": "x" * 1000},
        {"expires_s": -1.0},
    ],
)
def test_unusable_sessions_are_left_out(bad: dict) -> None:
    good = SessionSnapshot("s", "w0", pack_hashes([1, 2]), 1, 10, "stop", None, False, 1.0, 0.5, 0.0, 60.0)
    router = approx_router("w0")
    assert apply_sessions(router, [msgspec.structs.replace(good, **bad), good], 0.0) == 1
    assert router.sessions.get("s") is not None and router.sessions.get("s").chain == [1, 2]  # type: ignore[union-attr]
    with pytest.raises(ProtocolError):  # a chain that is not whole hashes: not a snapshot
        decode_snapshot(
            encode_snapshot(IndexSnapshot(2, 0, 0.0, "x", [], [msgspec.structs.replace(good, chain=b"123")]))
        )
