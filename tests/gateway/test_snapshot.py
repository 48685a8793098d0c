"""Index snapshots in a real nats-server's object store, and a new replica's recovery from the latest
snapshot plus the KV stream's tail."""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from nats.aio.client import Client as NATS
from nats.js import api

from gateway import snapshot as snapshot_module
from gateway.natsd import free_port
from gateway.snapshot import SNAPSHOT_OBJECT, IndexRecovery, SnapshotStore, Snapshotter
from router.protocol import (
    BlockRemoved,
    BlockStored,
    KvEventBatch,
    KvStateDump,
    Subjects,
    WorkerRegistration,
    encode,
)
from router.request import RouteRequest
from router.router import Router
from tests.gateway.conftest import Proc
from tests.gateway.gateways import RunningGateway, running_gateway
from tests.polling import until

WORKERS = ("w0", "w1", "w2")


def registration(wid: str, epoch: int = 1) -> WorkerRegistration:
    return WorkerRegistration(wid, "http://w", "m", 16, 4096, "mock", epoch, time.time())


class Cluster:
    """What the workers would have put on the bus: registrations and KV batches on JetStream."""

    def __init__(self, nc: NATS, subjects: Subjects) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = subjects
        self.rng = random.Random(3)
        self.seq = dict.fromkeys(WORKERS, -1)
        self.chains: list[list[int]] = []
        self.old = Router()  # the replica that was running all along

    async def setup(self, epochs: dict[str, int] | None = None) -> None:
        await self.js.add_stream(
            api.StreamConfig(
                name=self.subjects.kv_stream, subjects=[self.subjects.kv_all], storage=api.StorageType.FILE
            )
        )
        kv = await self.js.create_key_value(bucket=self.subjects.registry_bucket, history=1)
        for wid in WORKERS:
            reg = registration(wid, (epochs or {}).get(wid, 1))
            await kv.put(wid, encode(reg))
            self.old.add_worker(registration(wid), 0.0)

    async def publish(self, n: int) -> int:
        last = 0
        for _ in range(n):
            wid = self.rng.choice(WORKERS)
            if self.chains and self.rng.random() < 0.2:
                chain = self.rng.choice(self.chains)
                events: list[Any] = [BlockRemoved(chain[len(chain) // 2 :][::-1])]
            else:
                base = self.rng.choice(self.chains) if self.chains else []
                base = base[: self.rng.randint(0, len(base))]
                chain = base + [self.rng.getrandbits(64) for _ in range(self.rng.randint(1, 40))]
                self.chains.append(chain)
                events = [BlockStored(chain[len(base) :], base[-1] if base else None)]
            self.seq[wid] += 1
            batch = KvEventBatch(wid, 1, self.seq[wid], time.time(), events)
            self.old.apply_kv_batch(batch, 0.0)
            last = (await self.js.publish(self.subjects.kv(wid), encode(batch))).seq
        return last

    def agrees(self, router: Router) -> bool:
        return all(self.old.index.overlap(c) == router.index.overlap(c) for c in self.chains)


@pytest.fixture
async def cluster(nc: NATS, namespace: str) -> Cluster:
    running = Cluster(nc, Subjects(namespace))
    await running.setup()
    return running


async def test_store_roundtrip_and_absence(nc: NATS, namespace: str, cluster: Cluster) -> None:
    store = SnapshotStore(nc, Subjects(namespace))
    assert await store.get() is None and await store.created_ts() is None  # no bucket yet
    seq = await cluster.publish(30)
    taker = Snapshotter(store, cluster.old, lambda: seq, lambda: True, source="old")
    size = await taker.take()
    found = await store.get()
    assert found is not None
    snapshot, stored = found
    assert stored == size == taker.last_bytes and snapshot.stream_seq == seq and snapshot.source == "old"
    assert abs((await store.created_ts() or 0) - snapshot.created_ts) < 1e-6
    assert snapshot.num_blocks() == sum(cluster.old.index.blocks_of(w) for w in WORKERS)


async def test_a_corrupt_snapshot_is_ignored(nc: NATS, namespace: str, cluster: Cluster) -> None:
    subjects = Subjects(namespace)
    store = SnapshotStore(nc, subjects)
    await cluster.publish(10)
    await Snapshotter(store, cluster.old, lambda: 1, lambda: True).take()
    objects = await nc.jetstream().object_store(subjects.snapshot_bucket)
    await objects.put(SNAPSHOT_OBJECT, b"\x93not a snapshot")
    assert await store.get() is None
    # and a new replica then replays the whole stream instead
    router = Router()
    recovery = IndexRecovery(nc, subjects, router)
    await recovery.catch_up()
    assert recovery.snapshot is None and cluster.agrees(router)


async def test_a_snapshot_over_the_bound_is_not_read(
    nc: NATS, namespace: str, cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new replica reads the snapshot whole: only within MAX_SNAPSHOT_BYTES (its bucket's bound, which
    a bucket created by other means may lack)."""
    store = SnapshotStore(nc, Subjects(namespace))
    await cluster.publish(10)
    size = await Snapshotter(store, cluster.old, lambda: 1, lambda: True).take()
    monkeypatch.setattr(snapshot_module, "MAX_SNAPSHOT_BYTES", size - 1)
    assert await store.get() is None
    monkeypatch.setattr(snapshot_module, "MAX_SNAPSHOT_BYTES", size)
    assert await store.get() is not None


async def test_recovery_from_snapshot_and_tail(nc: NATS, namespace: str, cluster: Cluster) -> None:
    subjects = Subjects(namespace)
    seq = await cluster.publish(200)
    await Snapshotter(SnapshotStore(nc, subjects), cluster.old, lambda: seq, lambda: True).take()
    last = await cluster.publish(50)

    router = Router()
    recovery = IndexRecovery(nc, subjects, router)
    assert await recovery.catch_up() == last
    assert recovery.snapshot is not None and recovery.snapshot.stream_seq == seq
    assert recovery.replayed == last - seq  # only the tail was replayed
    assert recovery.lost == set() and not recovery.stale
    assert cluster.agrees(router)
    assert router.stream_positions() == cluster.old.stream_positions()
    assert sorted(router.workers()) == sorted(WORKERS)  # from the registry


async def test_recovery_restores_the_session_table(nc: NATS, namespace: str, cluster: Cluster) -> None:
    subjects = Subjects(namespace)
    seq = await cluster.publish(60)
    held = [c for c in cluster.chains if cluster.old.index.overlap(c)][:4]
    for i, chain in enumerate(held):
        cluster.old.pick(RouteRequest(f"r{i}", "m", chain, len(chain) * 16, f"s{i}", 8), 100.0)
    bound = {s.id: s.worker_id for s in cluster.old.sessions.values()}
    assert len(bound) == len(held) > 0
    # taken on the old replica's clock (100 s); the new one's clock reads 7 s
    snapshotter = Snapshotter(
        SnapshotStore(nc, subjects), cluster.old, lambda: seq, lambda: True, clock=lambda: 100.0
    )
    await snapshotter.take()
    router = Router()
    recovery = IndexRecovery(nc, subjects, router, clock=lambda: 7.0)
    await recovery.catch_up()
    assert recovery.sessions_restored == len(bound)
    assert {s.id: s.worker_id for s in router.sessions.values()} == bound
    for s in router.sessions.values():
        assert s.turns == 1 and 6.0 < s.last_pick_at <= 7.0  # picked just before the snapshot
        assert s.chain == cluster.old.sessions.get(s.id).chain  # type: ignore[union-attr]


async def test_recovery_without_a_snapshot_replays_everything(
    nc: NATS, namespace: str, cluster: Cluster
) -> None:
    last = await cluster.publish(80)
    router = Router()
    recovery = IndexRecovery(nc, Subjects(namespace), router)
    assert await recovery.catch_up() == last
    assert recovery.replayed == last and cluster.agrees(router)


async def test_no_stream_yet(nc: NATS, namespace: str) -> None:
    recovery = IndexRecovery(nc, Subjects(namespace), Router())
    assert await recovery.catch_up() == 0


async def dump_responder(nc: NATS, subjects: Subjects, router: Router, epoch: int = 1) -> list[Any]:
    """Workers answering state dump requests with what the old replica knows of them."""
    subs = []
    for wid in WORKERS:

        async def answer(msg: Any, wid: str = wid) -> None:
            from router.snapshot import build_snapshot

            (worker,) = [w for w in build_snapshot(router, 0, 0.0).workers if w.worker_id == wid]
            await msg.respond(encode(KvStateDump(wid, epoch, worker.seq, worker.blocks())))

        subs.append(await nc.subscribe(subjects.dump(wid), cb=answer))
    await nc.flush()
    return subs


async def test_a_snapshot_older_than_the_stream_asks_every_worker(
    nc: NATS, namespace: str, cluster: Cluster
) -> None:
    subjects = Subjects(namespace)
    seq = await cluster.publish(100)
    await Snapshotter(SnapshotStore(nc, subjects), cluster.old, lambda: seq, lambda: True).take()
    last = await cluster.publish(100)
    await nc.jetstream().purge_stream(subjects.kv_stream, seq=seq + 20)  # retention dropped a part
    router = Router()
    recovery = IndexRecovery(nc, subjects, router)
    assert await recovery.catch_up() == last
    assert recovery.stale
    await dump_responder(nc, subjects, cluster.old)
    dumped = await recovery.reconcile({w: 1 for w in WORKERS})
    assert sorted(dumped) == sorted(WORKERS)
    assert cluster.agrees(router)


async def test_reconcile_forgets_gone_workers_and_empties_restarted_ones(
    nc: NATS, namespace: str, cluster: Cluster
) -> None:
    subjects = Subjects(namespace)
    seq = await cluster.publish(60)
    await Snapshotter(SnapshotStore(nc, subjects), cluster.old, lambda: seq, lambda: True).take()
    router = Router()
    recovery = IndexRecovery(nc, subjects, router)
    await recovery.catch_up()
    chains = [c for c in cluster.chains if cluster.old.index.overlap(c)]
    assert chains and all(router.index.overlap(c) for c in chains)
    # w0 is gone, w1 restarted (epoch 2), w2 is as it was
    router.remove_worker("w0")
    await recovery.reconcile({"w1": 2, "w2": 1})
    assert router.stream_positions()["w1"] == (2, -1)
    for chain in chains:
        assert set(router.index.overlap(chain)) <= {"w2"}
        assert router.index.overlap(chain).get("w2") == cluster.old.index.overlap(chain).get("w2")
    # w1's new process publishes from seq 0: in order, no dump needed
    assert router.apply_kv_batch(KvEventBatch("w1", 2, 0, 0.0, [BlockStored([5, 6], None)]), 0.0)
    assert router.index.overlap([5, 6]) == {"w1": 2}


async def test_snapshotter_takes_turns_and_waits_for_readiness(
    nc: NATS, namespace: str, cluster: Cluster
) -> None:
    subjects = Subjects(namespace)
    seq = await cluster.publish(20)
    ready = [False]
    first = Snapshotter(
        SnapshotStore(nc, subjects), cluster.old, lambda: seq, lambda: ready[0], interval_s=0.2
    )
    second = Snapshotter(SnapshotStore(nc, subjects), cluster.old, lambda: seq, lambda: True, interval_s=30.0)
    task = asyncio.create_task(first.run())
    try:
        await asyncio.sleep(0.6)
        assert first.taken == 0  # not caught up: it must not store a partial index
        ready[0] = True
        deadline = time.monotonic() + 30  # a snapshot is a NATS round trip: slow on a loaded machine
        while first.taken < 2:  # then one every interval
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
    finally:
        task.cancel()
    assert not await second.round()  # another replica stored one within its interval: skip
    second.interval_s = 0.1
    await asyncio.sleep(0.2)
    assert await second.round() and second.taken == 1


async def test_an_empty_stream(nc: NATS, namespace: str) -> None:
    subjects = Subjects(namespace)
    await nc.jetstream().add_stream(api.StreamConfig(name=subjects.kv_stream, subjects=[subjects.kv_all]))
    recovery = IndexRecovery(nc, subjects, Router())
    assert await recovery.catch_up() == 0 and recovery.replayed == 0


class Registry:
    """Registrations of workers, kept alive by a heartbeat like the real workers' (synthetic workers
    at a dead URL unless `urls` says where they answer)."""

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        workers: list[str],
        urls: dict[str, str] | None = None,
        *,
        model: str = "m",
        events: bool = True,
    ) -> None:
        self.nc, self.subjects, self.workers = nc, subjects, workers
        self.urls = urls or {}
        self.model = model
        self.events = events
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.kv = await self.nc.jetstream().create_key_value(bucket=self.subjects.registry_bucket, history=1)
        await self.beat()
        self.task = asyncio.create_task(self.run())

    async def beat(self) -> None:
        for wid in self.workers:
            url = self.urls.get(wid, "http://127.0.0.1:9")
            reg = WorkerRegistration(
                wid, url, self.model, 16, 1 << 16, "mock", 1, time.time(), publishes_events=self.events
            )
            await self.kv.put(wid, encode(reg))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self.beat()


@pytest.mark.slow
async def test_a_replica_started_after_a_million_block_events_holds_what_the_old_one_holds(
    nc: NATS, nats_url: str, namespace: str
) -> None:
    """1M blocks of synthetic KV events on JetStream; an old gateway follows them, snapshots, follows a
    tail; a new gateway starts from the snapshot and the tail, and then finds every probe's prefix on the
    same workers at the same depths as the old one."""
    from gateway.replay_bench import Workload, publish
    from tests.gateway.gateways import running_gateway

    subjects = Subjects(namespace)
    js = nc.jetstream()
    await js.add_stream(
        api.StreamConfig(name=subjects.kv_stream, subjects=[subjects.kv_all], storage=api.StorageType.FILE)
    )
    workload = Workload(workers=8, batch_blocks=64, seed=11)
    registry = Registry(nc, subjects, workload.workers)
    await registry.start()
    # generous heartbeat staleness: both gateways share this test's event loop with 1M blocks of work
    config = {"stale_after_s": 30.0, "snapshot_interval_s": 3600.0}
    try:
        await publish(js, subjects, workload.numbered(workload.batches(1_000_000)))
        async with running_gateway(nats_url, namespace, "gw-old", **config) as old:
            await until(lambda: old.gateway.replication.index_ready, 60.0, "the old gateway's index")
            snapshotter = old.gateway.replication.snapshotter
            assert snapshotter is not None
            await snapshotter.take()
            last = await publish(js, subjects, workload.numbered(workload.batches(20_000)))  # the tail
            await until(lambda: old.gateway.bus.kv_stream_seq == last, 30.0, "the old gateway's tail")
            assert sum(old.router.index.blocks_of(w) for w in workload.workers) >= 1_000_000

            async with running_gateway(nats_url, namespace, "gw-new", **config) as new:
                await until(lambda: new.gateway.replication.index_ready, 30.0, "the new gateway's index")
                recovery = new.gateway.replication.recovery
                assert recovery is not None and recovery.snapshot is not None
                assert 0 < recovery.replayed < 1000  # the tail only, not the million
                assert new.router.stream_positions() == old.router.stream_positions()
                for w in workload.workers:
                    assert new.router.index.blocks_of(w) == old.router.index.blocks_of(w)
                for chain in workload.probes(300):
                    # the same holders at the same depths: what a pick reads. Picks themselves are not
                    # compared: between equal holders they follow the order each index lists them in,
                    # which depends on how it was built (events or snapshot), and one different tie
                    # moves the in-flight load every later pick reads
                    assert new.router.index.overlap(chain) == old.router.index.overlap(chain)
    finally:
        if registry.task is not None:
            registry.task.cancel()


SYSTEM_PROMPT = "You are a coding agent. Tools: read_file, write_file, run_tests, search. " * 40


async def chat_turn(
    gateway: RunningGateway, messages: list[dict[str, str]], session: str
) -> tuple[str, int, int, str]:
    """One turn through the real openai client: (worker, cached tokens, prompt tokens, reply)."""
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0)
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="mock",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=2,
            extra_headers={"x-session-id": session, "x-kvgate-tool-call": "pending"},
        )
    finally:
        await client.close()
    reply = raw.parse()
    assert raw.headers["x-kvgate-session"] == session
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens or 0
    return raw.headers["x-kvgate-worker"], cached, usage.prompt_tokens, reply.choices[0].message.content or ""


@pytest.mark.slow
async def test_a_new_replica_sends_each_session_to_its_worker_from_the_snapshot(
    nc: NATS, nats_url: str, namespace: str, tmp_path: Path
) -> None:
    """Two real workers that publish no KV events (an engine without a KV event feed): a gateway knows
    where a session's KV lives only from having routed it. Replica A serves two agent sessions that
    share a system prompt, on different workers, stores its snapshot and goes away; replica B starts
    from the snapshot, and the next turn of each session, sent to B, goes to that session's worker and
    hits its cache. Without the sessions in the snapshot B would send both turns to one worker (the
    second follows the system prompt the first one just put there)."""
    subjects = Subjects(namespace)
    procs: dict[str, Proc] = {}
    for wid in ("w0", "w1"):
        port = free_port()
        argv = ["worker", "--engine", "mock", "--port", str(port), "--worker-id", wid, "--speedup", "0.1"]
        procs[wid] = Proc(argv, f"http://127.0.0.1:{port}", tmp_path / f"{wid}.log")
    registry = Registry(
        nc, subjects, list(procs), {w: p.url for w, p in procs.items()}, model="mock", events=False
    )
    config = {"snapshot_interval_s": 3600.0}
    conversations = {sid: [{"role": "system", "content": SYSTEM_PROMPT}] for sid in ("agent", "chat")}
    bound: dict[str, str] = {}
    last_prompt: dict[str, int] = {}

    async def serve(gateway: RunningGateway, sid: str, text: str) -> tuple[str, int]:
        messages = conversations[sid]
        messages.append({"role": "user", "content": text})
        worker, cached, prompt, reply = await chat_turn(gateway, messages, sid)
        messages.append({"role": "assistant", "content": reply})
        last_prompt[sid] = prompt
        return worker, cached

    try:
        for proc in procs.values():
            await asyncio.to_thread(proc.wait_http, "/health", 60.0)
        await registry.start()
        async with running_gateway(nats_url, namespace, "gw-a", **config) as a:
            await a.wait_ready(workers=2)
            # the agent's first turn (~6k tokens) is still prefilling on its worker (~1 s) when the
            # chat's arrives: the chat goes to the other worker
            task = "task: fix the failing test in parser.py. Log of the failing run: " + "E " * 1500
            first = asyncio.create_task(serve(a, "agent", task))
            await until(lambda: "agent" in a.router.sessions, 30.0, "the agent's first pick")
            bound["chat"], _ = await serve(a, "chat", "question: what does the parser do?")
            bound["agent"], _ = await first
            assert bound["agent"] != bound["chat"]
            for turn in range(3):
                for sid in ("agent", "chat"):
                    worker, _ = await serve(a, sid, f"tool result {turn}: " + "x" * 120)
                    assert worker == bound[sid]
            snapshotter = a.gateway.replication.snapshotter
            assert snapshotter is not None
            await snapshotter.take()
        # A is gone: no route note can teach B anything

        async with running_gateway(nats_url, namespace, "gw-b", **config) as b:
            await b.wait_ready(workers=2)
            recovery = b.gateway.replication.recovery
            assert recovery is not None and recovery.sessions_restored == 2
            routed, cached, previous = {}, {}, dict(last_prompt)
            for sid in ("agent", "chat"):
                routed[sid], cached[sid] = await serve(b, sid, "tool result 3: " + "y" * 120)
            assert routed == bound
            for sid in ("agent", "chat"):
                assert cached[sid] >= 0.9 * previous[sid], (cached, previous)  # its KV was there
                session = b.router.sessions.get(sid)
                assert session is not None and session.turns == 5  # four turns on A, this one on B
            assert b.gateway.replication.replicas.applied == 0
    finally:
        if registry.task is not None:
            registry.task.cancel()
        for proc in procs.values():
            proc.stop()
