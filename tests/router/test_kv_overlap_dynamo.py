"""`kv_overlap` against the real NVIDIA Dynamo 1.6.1 KV router (PyPI `ai-dynamo-runtime`, the `peers`
extra; skipped without it).

Identical KV event streams go into Dynamo and into kvgate's router: into Dynamo's `RadixTree` (overlap
scores) and its runtime-free `SelectionService` (its scheduler: in-flight tracking, cost, pick), whose
workers' events arrive as vLLM's ZMQ publisher sends them. The same requests, first tokens and
completions follow. Every overlap score must be equal, every worker's cost must be equal, and Dynamo's
pick must be one of the cheapest by our costs (ties are broken at random on both sides).
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
import time
from typing import Any

import msgspec
import pytest

from router.hashing import block_hashes
from router.protocol import AllBlocksCleared, BlockRemoved, BlockStored, KvEventBatch, WorkerRegistration
from router.request import Decision, RouteRequest
from router.router import Router
from tests.router.policy_cases import view_of

dynamo = pytest.importorskip("dynamo._core", reason="the peers extra (ai-dynamo-runtime) is not installed")
zmq = pytest.importorskip("zmq")

BS = 16
WORKERS = 4


class Corpus:
    """Random prompts that share prefixes (system prompts, earlier turns) and their blocks' hashes."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.prompts: list[list[int]] = []
        for _ in range(8):
            self.prompt()

    def prompt(self) -> list[int]:
        rng = self.rng
        if self.prompts and rng.random() < 0.8:
            base = rng.choice(self.prompts)
            tokens = base[: rng.randrange(0, len(base) + 1)]
        else:
            tokens = []
        tokens = tokens + [rng.randrange(1, 50_000) for _ in range(rng.randrange(1, 12 * BS))]
        self.prompts.append(tokens)
        return tokens


class Cluster:
    """Which blocks each worker holds, kept prefix-closed as an engine keeps them (a block is stored
    after its parent and evicted only when none of its children is held)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.held: list[set[int]] = [set() for _ in range(WORKERS)]
        self.parent: dict[int, int | None] = {}
        self.tokens_of: dict[int, list[int]] = {}  # a block's hash -> the tokens up to its end

    def store(self, w: int, tokens: list[int]) -> tuple[list[int], int | None, list[int]] | None:
        """Store a random prefix of `tokens` on worker w: (new hashes, parent, their tokens)."""
        chain = block_hashes(tokens, BS)
        if not chain:
            return None
        n = self.rng.randrange(1, len(chain) + 1)
        first = 0
        while first < n and chain[first] in self.held[w]:
            first += 1
        if first == n:
            return None
        for i in range(first, n):
            self.parent[chain[i]] = chain[i - 1] if i else None
            self.tokens_of[chain[i]] = tokens[: (i + 1) * BS]
        self.held[w].update(chain[first:n])
        return chain[first:n], chain[first - 1] if first else None, tokens[first * BS : n * BS]

    def evict(self, w: int) -> list[int]:
        """Evict up to a few leaves (blocks none of whose children are held) from worker w."""
        held = self.held[w]
        parents = {self.parent[h] for h in held}
        leaves = [h for h in held if h not in parents]
        gone = self.rng.sample(leaves, min(len(leaves), self.rng.randrange(1, 4)))
        held.difference_update(gone)
        return gone


def our_router() -> Router:
    router = Router("kv_overlap")
    for w in range(WORKERS):
        router.add_worker(WorkerRegistration(f"w{w}", f"http://w{w}", "m", BS, 100_000, "mock", 1, 0.0), 0.0)
    return router


def test_overlap_scores_match_dynamos_radix_tree() -> None:
    rng = random.Random(7)
    corpus, cluster, router = Corpus(rng), Cluster(rng), our_router()
    tree = dynamo.RadixTree()
    seqs = [0] * WORKERS
    event_id = 0
    compared = nonzero = 0
    for step in range(2_500):
        w = rng.randrange(WORKERS)
        roll = rng.random()
        if roll < 0.35:
            stored = cluster.store(w, rng.choice(corpus.prompts))
            if stored is None:
                continue
            hashes, parent, tokens = stored
            local = dynamo.compute_block_hash_for_seq(tokens, BS)
            data = {
                "stored": {
                    "parent_hash": parent,
                    "blocks": [
                        {"block_hash": h, "tokens_hash": t} for h, t in zip(hashes, local, strict=True)
                    ],
                }
            }
            ours = BlockStored(hashes, parent)
        elif roll < 0.5:
            gone = cluster.evict(w)
            if not gone:
                continue
            data, ours = {"removed": {"block_hashes": gone}}, BlockRemoved(gone)
        elif roll < 0.51:
            cluster.held[w].clear()
            data, ours = "cleared", AllBlocksCleared()
        else:
            tokens = corpus.prompt() if rng.random() < 0.3 else rng.choice(corpus.prompts)
            found = tree.find_matches(dynamo.compute_block_hash_for_seq(tokens, BS)).scores
            theirs = {f"w{worker}": n for (worker, _rank), n in found.items() if n}
            assert router.index.overlap(block_hashes(tokens, BS)) == theirs, step
            compared += 1
            nonzero += bool(theirs)
            continue
        event_id += 1
        tree.apply_event(w, json.dumps({"event_id": event_id, "data": data, "dp_rank": 0}).encode())
        assert router.apply_kv_batch(KvEventBatch(f"w{w}", 1, seqs[w], 0.0, [ours]), 0.0)
        seqs[w] += 1
    assert compared >= 1_000 and nonzero >= 300


class DynamoPool:
    """Dynamo's selection service over WORKERS workers whose KV events it reads from ZMQ sockets, in
    vLLM's wire format (topic, 8-byte sequence number, msgpack [ts, events, dp_rank])."""

    # what each worker announces beside the defaults (a subclass adds fields)
    worker_fields: dict[str, Any] = {}

    def __init__(self, **service: Any) -> None:  # `service`: the selection service's own settings
        self.context = zmq.Context()
        self.service = dynamo.SelectionService(indexer_threads=1, **service)
        self.sockets: list = []
        self.seq = [0] * WORKERS
        self.encoder = msgspec.msgpack.Encoder()

    async def start(self) -> None:
        for w in range(WORKERS):
            socket = self.context.socket(zmq.PUB)
            port = socket.bind_to_random_port("tcp://127.0.0.1")
            self.sockets.append(socket)
            await self.service.upsert_worker(
                {
                    "worker_id": w,
                    "endpoint": f"http://127.0.0.1:1/{w}",
                    "block_size": BS,
                    "total_kv_blocks": 100_000,
                    "kv_events_endpoint": f"tcp://127.0.0.1:{port}",
                    **self.worker_fields,
                }
            )

    def publish(self, w: int, event: list) -> None:
        batch = self.encoder.encode([time.time(), [event], None])
        self.sockets[w].send_multipart([b"kv-events", struct.pack(">q", self.seq[w]), batch])
        self.seq[w] += 1

    async def wait_subscribed(self) -> None:
        """ZMQ's slow joiner: a PUB socket drops what it sends before the SUB side has connected. Each
        worker sends a probe block until Dynamo's index shows it, then its removal (a probe lost before
        that is a sequence gap, which Dynamo logs and skips)."""
        for w in range(WORKERS):
            tokens = [50_001 + w] * BS  # outside the corpus's tokens
            hashes = block_hashes(tokens, BS)

            async def probed(w: int = w, tokens: list[int] = tokens, hashes: list[int] = hashes) -> bool:
                self.publish(w, ["BlockStored", hashes, None, tokens, BS, None, "GPU"])
                await asyncio.sleep(0.05)
                return f"w{w}" in await self.device_overlap(tokens)

            async def cleared(tokens: list[int] = tokens) -> bool:
                return not await self.device_overlap(tokens)

            await until(probed, f"worker {w}'s events reaching Dynamo", 60.0)
            self.publish(w, ["BlockRemoved", hashes, "GPU"])
            await until(cleared, f"worker {w}'s probe removed", 60.0)

    async def device_overlap(self, tokens: list[int]) -> dict[str, int]:
        found = await self.service.overlap_scores({"token_ids": tokens})
        rows = found["workers"]
        return {f"w{row['worker_id']}": row["device_blocks"] for row in rows if row["device_blocks"]}

    async def costs(self, tokens: list[int]) -> dict[str, float]:
        """Each worker's logit, from the scheduler's potential loads: with the default weights it is
        potential prefill tokens / block size + potential decode blocks."""
        loads = await self.service.potential_loads({"token_ids": tokens})
        return {
            f"w{row['worker_id']}": row["potential_prefill_tokens"] / BS + row["potential_decode_blocks"]
            for row in loads
        }

    def close(self) -> None:
        self.service.shutdown()
        for socket in self.sockets:
            socket.close(linger=0)
        self.context.term()


async def until(check, what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.005)


async def replay_against_dynamo(steps: int, seed: int) -> int:
    rng = random.Random(seed)
    corpus, cluster, router = Corpus(rng), Cluster(rng), our_router()
    pool = DynamoPool()
    await pool.start()
    try:

        async def ready() -> bool:
            return pool.service.ready()["ready"]

        await until(ready, "Dynamo's workers schedulable", 60.0)
        await pool.wait_subscribed()
        ours_seq = [0] * WORKERS
        in_flight: list[tuple[str, bool]] = []  # (request id, first token seen)
        picks = 0
        for step in range(steps):
            w = rng.randrange(WORKERS)
            roll = rng.random()
            if roll < 0.3:
                tokens = rng.choice(corpus.prompts)
                stored = cluster.store(w, tokens)
                if stored is None:
                    continue
                hashes, parent, block_tokens = stored
                pool.publish(w, ["BlockStored", hashes, parent, block_tokens, BS, None, "GPU"])
                event, probe = BlockStored(hashes, parent), tokens
            elif roll < 0.4:
                gone = cluster.evict(w)
                if not gone:
                    continue
                pool.publish(w, ["BlockRemoved", gone, "GPU"])
                event, probe = BlockRemoved(gone), cluster.tokens_of[gone[0]]
            elif roll < 0.65 and in_flight:
                i = rng.randrange(len(in_flight))
                rid, started = in_flight[i]
                if not started and rng.random() < 0.6:
                    await pool.service.prefill_complete(rid)
                    router.on_first_token(rid, 0.0)
                    in_flight[i] = (rid, True)
                else:
                    await pool.service.free_reservation(rid)
                    router.on_complete(rid, 0.0, "stop", 1)
                    in_flight.pop(i)
                continue
            else:
                tokens = corpus.prompt() if rng.random() < 0.4 else rng.choice(corpus.prompts)
                chain = block_hashes(tokens, BS)
                request = RouteRequest(f"r{step}", "m", chain, len(tokens))
                view = view_of(router)
                overlap = view.overlap(chain)
                ours = router.policy.logits(request, view, overlap)
                assert await pool.costs(tokens) == ours, step
                picked = await pool.service.select_and_reserve(
                    {"token_ids": tokens, "selection_id": request.request_id}
                )
                worker = f"w{picked['worker_id']}"
                assert ours[worker] == min(ours.values()), (step, worker, ours)
                decision = Decision(worker, overlap.get(worker, 0), ours[worker], "dynamo")
                assert router.record(request, decision, 0.0)
                in_flight.append((request.request_id, False))
                picks += 1
                continue
            assert router.apply_kv_batch(KvEventBatch(f"w{w}", 1, ours_seq[w], 0.0, [event]), 0.0)
            ours_seq[w] += 1
            # wait until Dynamo applied it: every worker's overlap on the prompt it touched agrees
            expected = router.index.overlap(block_hashes(probe, BS))

            async def applied(probe: list[int] = probe, expected: dict[str, int] = expected) -> bool:
                return await pool.device_overlap(probe) == expected

            await until(applied, f"step {step}: Dynamo's overlap differs from ours")
        return picks
    finally:
        pool.close()


def test_costs_and_picks_match_dynamos_scheduler() -> None:
    picks = asyncio.run(replay_against_dynamo(steps=2_800, seed=11))
    assert picks >= 1_000
