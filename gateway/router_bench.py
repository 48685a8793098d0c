"""`kvgate bench router`: hashing, routing and event ingestion at scale, all through the real code.

Builds an index of `--blocks` distinct blocks over `--workers` workers from msgpack-encoded event
batches (a system prompt every worker holds, then one long session chain per slot, one in ten of them
also half-held by a second worker), then measures:
- hashing a fresh prompt of `--prompt-tokens`, and extending one by 1,024 tokens incrementally;
- `Router.pick` (policy `--policy`, default session_kv) for a session's next turn: the prompt shares all
  but its last 1,024 tokens with a chain some worker holds; the pick records its in-flight prediction
  and the session, as in the gateway;
- ingestion: decode msgpack `KvEventBatch` bytes and apply them (evicting then re-storing the tails of a
  quarter of the sessions), in block events (one block stored or removed) per second;
- wall-clock and on-CPU figures side by side: on a shared machine the wall clock also counts the time
  other processes held the CPU (a preemption costs a scheduler slice, ~4 ms, which is what a p99 shows);
- memory: bytes traced by tracemalloc while the index was built, per index entry (a distinct block hash
  on one tier, with its worker bitmask and its parent->child link).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import time
import tracemalloc
from collections.abc import Callable

from router.hashing import PrefixHasher, block_hashes
from router.policies import POLICIES
from router.protocol import (
    BlockRemoved,
    BlockStored,
    KvEventBatch,
    LoadReport,
    WorkerRegistration,
    decode,
    encode,
)
from router.request import RouteRequest
from router.router import Router

SYSTEM_BLOCKS = 128
EVENT_BLOCKS = 64  # blocks per stored/removed event
BATCH_EVENTS = 4  # events per batch


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=64, help="workers in the index (64)")
    parser.add_argument("--blocks", type=int, default=2_000_000, help="distinct blocks in the index")
    parser.add_argument("--prompt-tokens", type=int, default=32_768, help="tokens of the routed prompt")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per block")
    parser.add_argument("--iterations", type=int, default=2000, help="timed repetitions per measure")
    parser.add_argument("--policy", default="session_kv", choices=list(POLICIES), help="the picking policy")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic cache and prompts")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed_us(
    fn: Callable[[int], object], iterations: int, setup: Callable[[int], object] | None = None
) -> tuple[list[float], list[float]]:
    """Wall-clock and on-CPU microseconds per call (on a shared machine the two differ by preemption)."""
    wall, cpu = [], []
    clock, cpu_clock = time.perf_counter_ns, time.thread_time_ns
    for i in range(iterations):
        if setup is not None:
            setup(i)
        c0, t0 = cpu_clock(), clock()
        fn(i)
        t1, c1 = clock(), cpu_clock()
        wall.append((t1 - t0) / 1000.0)
        cpu.append((c1 - c0) / 1000.0)
    return wall, cpu


class Corpus:
    """The synthetic cache: which chains exist and who holds them, as encoded event batches."""

    def __init__(self, workers: int, blocks: int, chain_blocks: int, rng: random.Random) -> None:
        bits = rng.getrandbits
        self.workers = [f"w{i}" for i in range(workers)]
        self.system = [bits(64) for _ in range(SYSTEM_BLOCKS)]
        tail = max(1, chain_blocks - SYSTEM_BLOCKS)
        n_sessions = max(1, (blocks - SYSTEM_BLOCKS) // tail)
        self.sessions: list[tuple[list[int], list[str]]] = []
        for i in range(n_sessions):
            chain = self.system + [bits(64) for _ in range(tail)]
            holders = [self.workers[i % workers]]
            if i % 10 == 0 and workers > 1:
                holders.append(self.workers[(i + 1) % workers])
            self.sessions.append((chain, holders))
        self._seq = dict.fromkeys(self.workers, -1)

    def batches(self, worker: str, events: list) -> list[bytes]:
        out = []
        for i in range(0, len(events), BATCH_EVENTS):
            self._seq[worker] += 1
            batch = KvEventBatch(worker, 1, self._seq[worker], 0.0, events[i : i + BATCH_EVENTS])
            out.append(encode(batch))
        return out

    def build(self) -> tuple[list[bytes], int]:
        """Batches that store everything, interleaved across workers; and their block event count."""
        per_worker: dict[str, list] = {w: [BlockStored(self.system)] for w in self.workers}
        count = SYSTEM_BLOCKS * len(self.workers)
        for n, (chain, holders) in enumerate(self.sessions):
            for k, worker in enumerate(holders):
                end = len(chain) if k == 0 else len(chain) // 2
                per_worker[worker].extend(_stored(chain, SYSTEM_BLOCKS, end))
                count += end - SYSTEM_BLOCKS
            del n
        return _interleave([self.batches(w, ev) for w, ev in per_worker.items()]), count

    def churn(self, rng: random.Random, tail_blocks: int) -> tuple[list[bytes], int]:
        """Evict the tails of a quarter of the sessions (leaf first, as engines do), then store them back."""
        per_worker: dict[str, list] = {w: [] for w in self.workers}
        count = 0
        for chain, holders in rng.sample(self.sessions, max(1, len(self.sessions) // 4)):
            worker = holders[0]
            start = len(chain) - tail_blocks
            tail = chain[start:]
            for i in range(len(tail), 0, -EVENT_BLOCKS):
                per_worker[worker].append(BlockRemoved(tail[max(0, i - EVENT_BLOCKS) : i][::-1]))
            per_worker[worker].extend(_stored(chain, start, len(chain)))
            count += 2 * len(tail)
        return _interleave([self.batches(w, ev) for w, ev in per_worker.items() if ev]), count


def _stored(chain: list[int], start: int, end: int) -> list[BlockStored]:
    return [
        BlockStored(chain[i : min(end, i + EVENT_BLOCKS)], chain[i - 1] if i else None)
        for i in range(start, end, EVENT_BLOCKS)
    ]


def _interleave(streams: list[list[bytes]]) -> list[bytes]:
    out: list[bytes] = []
    for i in range(max((len(s) for s in streams), default=0)):
        out.extend(s[i] for s in streams if i < len(s))
    return out


def ingest(router: Router, batches: list[bytes], now: float) -> None:
    for data in batches:
        router.apply_kv_batch(decode(data, KvEventBatch), now)


def measure(args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(args.seed)
    chain_blocks = args.prompt_tokens // args.block_size
    corpus = Corpus(args.workers, args.blocks, chain_blocks, rng)
    router, build_events, index_bytes = _built_router(args, corpus)
    entries = len(router.index)
    pairs = sum(router.index.blocks_of(w) for w in corpus.workers)
    wall_rates, cpu_rates = _ingest_rates(router, corpus, rng, chain_blocks)
    _report_load(router, corpus.workers, rng, 1.0)
    hash_us, inc_us, inc_cpu = _hash_timings(args, rng)
    route_us, route_cpu = _route_timings(args, router, corpus, rng, chain_blocks)
    bs = args.block_size

    return {
        "policy": args.policy,
        "workers": args.workers,
        "blocks": entries,
        "prompt_tokens": args.prompt_tokens,
        "block_size": bs,
        "hash_us_p50": round(percentile(hash_us, 0.5), 1),
        "hash_us_p99": round(percentile(hash_us, 0.99), 1),
        "hash_incremental_us_p50": round(percentile(inc_us, 0.5), 1),
        "hash_incremental_us_p99": round(percentile(inc_us, 0.99), 1),
        "route_us_p50": round(percentile(route_us, 0.5), 1),
        "route_us_p99": round(percentile(route_us, 0.99), 1),
        "ingest_events_per_s": round(percentile(wall_rates, 0.5)),
        "ingest_events_per_cpu_s": round(percentile(cpu_rates, 0.5)),
        "route_cpu_us_p50": round(percentile(route_cpu, 0.5), 1),
        "route_cpu_us_p99": round(percentile(route_cpu, 0.99), 1),
        "hash_incremental_cpu_us_p50": round(percentile(inc_cpu, 0.5), 1),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
        "build_events": build_events,
        "index_bytes": index_bytes,
        "index_bytes_per_entry": round(index_bytes / max(1, entries), 1),
        "index_bytes_per_held_block": round(index_bytes / max(1, pairs), 1),
        "entry": "a distinct block hash on one tier: its worker bitmask and its parent->child link",
    }


def _built_router(args: argparse.Namespace, corpus: Corpus) -> tuple[Router, int, int]:
    """A router over the corpus's workers with every block ingested: (router, events, index bytes)."""
    build_batches, build_events = corpus.build()
    router = Router(policy=args.policy, seed=args.seed)
    for w in corpus.workers:
        registration = WorkerRegistration(
            w, f"http://{w}", "bench", args.block_size, 1 << 16, "bench", 1, 0.0
        )
        router.add_worker(registration, 0.0)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    ingest(router, build_batches, 0.0)
    index_bytes = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return router, build_events, index_bytes


def _ingest_rates(
    router: Router, corpus: Corpus, rng: random.Random, chain_blocks: int
) -> tuple[list[float], list[float]]:
    """Churn events per wall second and per CPU second, one of each per round."""
    wall_rates, cpu_rates = [], []
    for _ in range(3):  # three rounds, the median reported: one preemption should not decide it
        churn_batches, churn_events = corpus.churn(rng, min(512, chain_blocks - SYSTEM_BLOCKS))
        t0, c0 = time.perf_counter(), time.thread_time()
        ingest(router, churn_batches, 1.0)
        wall_rates.append(churn_events / (time.perf_counter() - t0))
        cpu_rates.append(churn_events / max(time.thread_time() - c0, 1e-9))
        del churn_batches
    return wall_rates, cpu_rates


def _report_load(router: Router, workers: list[str], rng: random.Random, now: float) -> None:
    """Every worker's load report (they report at 10 Hz: fresh reports, as in a live gateway)."""
    for w in workers:
        active = rng.randrange(8192)
        report = LoadReport(w, now, rng.randrange(4), rng.randrange(4), active, 0, 1 << 16, 3e4, 1e3)
        router.apply_load(report, now)


def _hash_timings(
    args: argparse.Namespace, rng: random.Random
) -> tuple[list[float], list[float], list[float]]:
    """A fresh prompt's hashing (us), and a session's next turn of 1,024 tokens on a prompt of that
    size (us, CPU us)."""
    bs = args.block_size
    tokens = [rng.randrange(50_000) for _ in range(args.prompt_tokens)]
    hash_us, _ = timed_us(lambda i: block_hashes(tokens, bs), max(20, args.iterations // 10))
    turn = [rng.randrange(50_000) for _ in range(1024)]
    hasher = PrefixHasher(bs)
    hasher.extend(tokens)
    inc_us, inc_cpu = timed_us(
        lambda i: hasher.extend(turn), args.iterations, lambda i: hasher.truncate(len(tokens), tokens)
    )
    return hash_us, inc_us, inc_cpu


def _route_timings(
    args: argparse.Namespace, router: Router, corpus: Corpus, rng: random.Random, chain_blocks: int
) -> tuple[list[float], list[float]]:
    """The next turn of a known session (all but its last 1,024 tokens cached somewhere): us, CPU us."""
    fresh = 1024 // args.block_size
    requests = []
    for i in range(256):
        chain, _ = corpus.sessions[rng.randrange(len(corpus.sessions))]
        prompt = chain[: chain_blocks - fresh] + [rng.getrandbits(64) for _ in range(fresh)]
        requests.append((f"s{i}", prompt))
    clock = [2.0]

    def route(i: int) -> None:
        sid, prompt = requests[i % len(requests)]
        router.pick(RouteRequest(f"r{i}", "bench", prompt, args.prompt_tokens, sid, 256), clock[0])

    def settle(i: int) -> None:
        if i:
            router.on_first_token(f"r{i - 1}", clock[0])
            router.on_complete(f"r{i - 1}", clock[0], "tool_calls", 256)
        clock[0] += 0.001
        if i % 100 == 0:
            _report_load(router, corpus.workers, rng, clock[0])

    timed_us(route, len(requests), settle)  # warm-up: every session known once
    return timed_us(lambda i: route(i + len(requests)), args.iterations, lambda i: settle(i + len(requests)))


def run(args: argparse.Namespace) -> int:
    if (
        args.workers < 1
        or args.blocks < SYSTEM_BLOCKS
        or args.prompt_tokens < (SYSTEM_BLOCKS + 128) * args.block_size
    ):
        print("need --workers >= 1, --blocks >= 128 and --prompt-tokens >= 256 blocks")
        return 2
    result = measure(args)
    if args.json:
        print(json.dumps(result))
        return 0
    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value}")
    return 0
