"""`kvgate bench replay`: how long a new gateway replica takes to a ready index, from the latest
snapshot plus the stream's tail, against replaying the whole KV event stream.

On a real nats-server started by the bench (gateway.natsd): synthetic `KvEventBatch`es of `--workers`
workers are published on the JetStream KV stream until the index holds `--blocks` blocks (a system
prompt every worker holds, then session chains of 256-2,048 blocks in batches of `--batch-blocks`, as
prefill chunks arrive, a tenth of them later evicted leaf first). An "old replica" router applies
them, a snapshot of it goes to the object store, and `--tail-batches` more batches follow. Then:
- `catchup_s`: a fresh router through `gateway.snapshot.IndexRecovery.catch_up` on a new connection
  (fetch and decode the snapshot, load it, replay the tail), to the stream's last sequence;
- `full_replay_s`: a fresh router replaying the whole stream, the same code without a snapshot;
- `snapshot_bytes`, `snapshot_build_s`, `snapshot_put_s`; and `agree`: both fresh routers answer
  `--probes` prefix queries exactly like the old one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from typing import Any

import nats

from gateway.natsd import NatsServer
from gateway.snapshot import IndexRecovery, SnapshotStore
from kvutil.kv_stream import kv_stream_config
from router.protocol import (
    BlockRemoved,
    BlockStored,
    KvEvent,
    KvEventBatch,
    Subjects,
    WorkerRegistration,
    encode,
)
from router.router import Router
from router.snapshot import build_snapshot

GOAL_CATCHUP_S = 5.0
_PUBLISH_WINDOW = 256  # JetStream publishes in flight at once


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--blocks", type=int, default=1_000_000, help="indexed blocks before the snapshot")
    parser.add_argument("--workers", type=int, default=8, help="workers the blocks are spread over")
    parser.add_argument("--batch-blocks", type=int, default=64, help="blocks per published batch")
    parser.add_argument("--tail-batches", type=int, default=500, help="batches published after the snapshot")
    parser.add_argument(
        "--churn",
        type=float,
        default=0.0,
        help="also store and evict this many times --blocks of short-lived chains before the snapshot "
        "(a real stream holds far more events than the index)",
    )
    parser.add_argument("--probes", type=int, default=500, help="prefix queries compared at the end")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic chains")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


class Workload:
    """Synthetic KV event batches per worker, with sequence numbers, mirrored into the old router."""

    def __init__(self, workers: int, batch_blocks: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.workers = [f"w{i}" for i in range(workers)]
        self.batch_blocks = batch_blocks
        self.seq = dict.fromkeys(self.workers, -1)
        self.system = [self.rng.getrandbits(64) for _ in range(64)]  # every worker holds it
        self.chains: list[list[int]] = [self.system]
        self.stored = 0

    def numbered(self, pending: list[tuple[str, list[KvEvent]]]) -> list[KvEventBatch]:
        """Batches with each worker's next sequence numbers, in the order given."""
        out = []
        for worker, events in pending:
            self.seq[worker] += 1
            out.append(KvEventBatch(worker, 1, self.seq[worker], time.time(), events))
        return out

    def batches(self, blocks: int) -> list[tuple[str, list[KvEvent]]]:
        """Batches that store about `blocks` more blocks (net of evictions)."""
        out: list[tuple[str, list[KvEvent]]] = [
            (w, [BlockStored(self.system, None)]) for w in self.workers if self.stored == 0
        ]
        self.stored += len(self.system) * len(out)
        rng = self.rng
        target = self.stored + blocks
        while self.stored < target:
            worker = rng.choice(self.workers)
            chain = [rng.getrandbits(64) for _ in range(rng.randint(256, 2048))]
            full = self.system + chain
            self.chains.append(full)
            parent = self.system[-1]
            for i in range(0, len(chain), self.batch_blocks):
                part = chain[i : i + self.batch_blocks]
                out.append((worker, [BlockStored(part, parent)]))
                parent = part[-1]
            self.stored += len(chain)
            if rng.random() < 0.1:  # evicted leaf first, as an engine's LRU does
                gone = chain[len(chain) // 2 :][::-1]
                out.append((worker, [BlockRemoved(gone)]))
                self.stored -= len(gone)
        return out

    def churn(self, blocks: int) -> list[tuple[str, list[KvEvent]]]:
        """Chains stored then evicted: events in the stream, nothing left in the index."""
        out: list[tuple[str, list[KvEvent]]] = []
        rng = self.rng
        done = 0
        while done < blocks:
            worker = rng.choice(self.workers)
            chain = [rng.getrandbits(64) for _ in range(rng.randint(64, 512))]
            parent = self.system[-1]
            for i in range(0, len(chain), self.batch_blocks):
                part = chain[i : i + self.batch_blocks]
                out.append((worker, [BlockStored(part, parent)]))
                parent = part[-1]
            out.append((worker, [BlockRemoved(chain[::-1])]))
            done += len(chain)
        return out

    def probes(self, n: int) -> list[list[int]]:
        rng = self.rng
        return [c[: rng.randint(1, len(c))] for c in rng.choices(self.chains, k=n)]


async def publish(js: Any, subjects: Subjects, batches: list[KvEventBatch]) -> int:
    """Publish in order with a window of acks in flight; returns the last stream sequence."""
    last = 0
    for i in range(0, len(batches), _PUBLISH_WINDOW):
        window = batches[i : i + _PUBLISH_WINDOW]
        acks = []
        for batch in window:  # sequential submits keep the order; the acks are awaited together
            acks.append(asyncio.ensure_future(js.publish(subjects.kv(batch.worker_id), encode(batch))))
            await asyncio.sleep(0)
        for ack in await asyncio.gather(*acks):
            last = max(last, ack.seq)
    return last


def agree(old: Router, new: Router, probes: list[list[int]]) -> bool:
    return all(old.index.overlap(chain) == new.index.overlap(chain) for chain in probes)


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    subjects = Subjects("bench")
    with NatsServer() as server:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await _add_kv_stream(js, subjects)
        workload = Workload(args.workers, args.batch_blocks, args.seed)
        old = await _registered_router(js, subjects, workload)
        batches = workload.numbered(_with_churn(workload, args.blocks, args.churn))
        for batch in batches:
            old.apply_kv_batch(batch, 0.0)
        snapshot_seq = await publish(js, subjects, batches)

        started = time.perf_counter()
        snapshot = build_snapshot(old, snapshot_seq, time.time(), "bench")
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        snapshot_bytes = await SnapshotStore(nc, subjects).put(snapshot)
        put_s = time.perf_counter() - started

        tail = workload.numbered(workload.batches(args.tail_batches * args.batch_blocks)[: args.tail_batches])
        for batch in tail:
            old.apply_kv_batch(batch, 0.0)
        last = await publish(js, subjects, tail)
        await nc.close()

        probes = workload.probes(args.probes)
        catchup_s, caught_up = await _recover(server.url, subjects, last, use_snapshot=True)
        full_s, replayed = await _recover(server.url, subjects, last, use_snapshot=False)
    return {
        "blocks": sum(old.index.blocks_of(w) for w in workload.workers),
        "workers": args.workers,
        "batches": len(batches) + len(tail),
        "tail_batches": len(tail),
        "churn": args.churn,
        "snapshot_blocks": snapshot.num_blocks(),
        "snapshot_bytes": snapshot_bytes,
        "snapshot_build_s": round(build_s, 3),
        "snapshot_put_s": round(put_s, 3),
        "catchup_s": round(catchup_s, 3),
        "full_replay_s": round(full_s, 3),
        "catchup_vs_full_replay": round(catchup_s / full_s, 3) if full_s else None,
        "goal_catchup_s": GOAL_CATCHUP_S,
        "goal_met": catchup_s <= GOAL_CATCHUP_S,
        "agree": agree(old, caught_up, probes) and agree(old, replayed, probes),
    }


async def _add_kv_stream(js: Any, subjects: Subjects) -> None:
    await js.add_stream(kv_stream_config(subjects.kv_stream, subjects.kv_all))  # as the workers do


async def _registered_router(js: Any, subjects: Subjects, workload: Workload) -> Router:
    """The workers registered on the bus, and a router that knows them (the index to recover)."""
    router = Router()
    registry = await js.create_key_value(bucket=subjects.registry_bucket, history=1)
    for wid in workload.workers:
        registration = WorkerRegistration(wid, "http://127.0.0.1:1", "m", 16, 1 << 16, "mock", 1, time.time())
        await registry.put(wid, encode(registration))
        router.add_worker(registration, 0.0)
    return router


def _with_churn(workload: Workload, blocks: int, churn_fraction: float) -> list[tuple[str, list[KvEvent]]]:
    """`blocks` stored, with `churn_fraction` of them in evictions interleaved all along (not after
    the index is built)."""
    pending = workload.batches(blocks)
    if churn_fraction <= 0:
        return pending
    churn = workload.churn(int(churn_fraction * blocks))
    every = max(1, len(pending) // max(1, len(churn)))
    per = max(1, -(-len(churn) * every // len(pending)))
    mixed = []
    for i, item in enumerate(pending):
        mixed.append(item)
        if i % every == 0:
            mixed.extend(churn[:per])
            del churn[:per]
    return mixed + churn


async def _recover(url: str, subjects: Subjects, last: int, use_snapshot: bool) -> tuple[float, Router]:
    """A new replica's catch-up on a fresh connection, timed from connecting to the last sequence."""
    started = time.perf_counter()
    nc = await nats.connect(url)
    router = Router()
    recovery = IndexRecovery(nc, subjects, router, requester="bench", stale_after_s=3600.0)
    if use_snapshot:
        resumed = await recovery.catch_up()
    else:
        await recovery.register_workers()
        await recovery.replay(1, last)
        resumed = last
    elapsed = time.perf_counter() - started
    await nc.close()
    if resumed != last:
        raise RuntimeError(f"recovery stopped at stream seq {resumed}, expected {last}")
    return elapsed, router


def run(args: argparse.Namespace) -> int:
    if args.blocks < 1 or args.workers < 1 or args.batch_blocks < 1 or args.tail_batches < 0:
        print("--blocks, --workers and --batch-blocks must be positive, --tail-batches not negative")
        return 2
    result = asyncio.run(bench(args))
    if args.json:
        print(json.dumps(result))
        return 0
    r = result
    print(f"index: {r['blocks']:,} blocks over {r['workers']} workers, {r['batches']:,} batches")
    print(
        f"snapshot: {r['snapshot_bytes']:,} bytes, built {r['snapshot_build_s']} s, "
        f"stored {r['snapshot_put_s']} s"
    )
    goal = "met" if r["goal_met"] else "NOT met"
    print(f"catch-up, snapshot + {r['tail_batches']} tail batches: {r['catchup_s']} s (goal: {goal})")
    print(f"full replay: {r['full_replay_s']} s; catch-up / full replay = {r['catchup_vs_full_replay']}")
    print(f"recovered indexes agree with the old one: {r['agree']}")
    return 0
