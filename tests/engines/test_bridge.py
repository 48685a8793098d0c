"""The vLLM/SGLang event bridge against a real ZMQ publisher and a real nats-server.

The publisher in these tests sends the exact frames vLLM's `ZmqEventPublisher` sends (topic, 8-byte
big-endian seq, msgpack EventBatch), with the events encoded by msgspec tagged structs as vLLM defines
them: the newer map layout (`{"type": "BlockStored", ...}`) and the older positional one
(`["BlockStored", hashes, ...]`, also SGLang's), and answers replay requests on a ROUTER socket the
way vLLM does. It binds an XPUB socket (a PUB that also reports subscriptions) only so a test can wait
until the bridge has subscribed instead of losing its first messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import nats
import openai
import pytest
import zmq
import zmq.asyncio
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from engines.bridge import (
    Bridge,
    BridgeConfig,
    EventTranslator,
    WireError,
    decode_batch,
    parse_metrics,
)
from gateway.cli import main as kvgate_main
from gateway.natsd import free_port
from router.chat import ByteTokenizer, encode_chat
from router.hashing import block_hashes, hash_seed
from router.index import BlockIndex
from router.protocol import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEventBatch,
    KvStateDump,
    LoadReport,
    StateDumpRequest,
    Subjects,
    WorkerRegistration,
    decode,
    encode,
)
from tests.engines.vllm_events import VllmAllBlocksCleared, VllmBlockRemoved, VllmBlockStored, VllmEventBatch
from tests.gateway.conftest import Proc, http_get
from tests.polling import until
from tests.serving import serving

B = 16
WORKER = "vllm-0"
TOKENS = list(range(1000, 1000 + 4 * B))  # 4 full blocks

# --- vLLM's event structs, newer (map, tag key "type") and older (positional) layouts


class ArrayStored(msgspec.Struct, tag="BlockStored", array_like=True):
    block_hashes: list[int | bytes]
    parent_block_hash: int | bytes | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class ArrayRemoved(msgspec.Struct, tag="BlockRemoved", array_like=True):
    block_hashes: list[int | bytes]
    medium: str | None


class ArrayCleared(msgspec.Struct, tag="AllBlocksCleared", array_like=True):
    pass


class ArrayBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[ArrayStored | ArrayRemoved | ArrayCleared]
    data_parallel_rank: int | None = None


def map_batch(*events: Any) -> bytes:
    return msgspec.msgpack.encode(VllmEventBatch(time.time(), list(events), 0))


def array_batch(*events: Any) -> bytes:
    return msgspec.msgpack.encode(ArrayBatch(time.time(), list(events), None))


def stored(
    hashes: list[Any], parent: Any, tokens: list[int], medium: str | None = "GPU", **kw: Any
) -> VllmBlockStored:
    return VllmBlockStored(hashes, parent, tokens, B, None, medium, kw.pop("lora_name", None), **kw)


# --- a publisher speaking vLLM's ZMQ protocol


class EnginePublisher:
    """vLLM's ZmqEventPublisher, wire-for-wire: PUB frames and a ROUTER replay buffer."""

    def __init__(self, ctx: zmq.asyncio.Context, topic: str = "kv-events") -> None:
        self.topic = topic.encode()
        self.pub = ctx.socket(zmq.XPUB)
        self.pub_port = self.pub.bind_to_random_port("tcp://127.0.0.1")
        self.router = ctx.socket(zmq.ROUTER)
        self.replay_port = self.router.bind_to_random_port("tcp://127.0.0.1")
        self.buffer: list[tuple[int, bytes]] = []
        self.next_seq = 0
        self.replay_requests: list[int] = []
        self._replay_task = asyncio.create_task(self._serve_replay())

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.pub_port}"

    @property
    def replay_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.replay_port}"

    async def wait_subscribed(self) -> None:
        frame = await asyncio.wait_for(self.pub.recv(), 10)
        assert frame[:1] == b"\x01"  # a subscription

    async def send(self, payload: bytes, *, drop: bool = False) -> int:
        """Publish the next batch; `drop` keeps it in the replay buffer only (as the PUB socket
        does past its high-water mark)."""
        seq = self.next_seq
        self.next_seq += 1
        self.buffer.append((seq, payload))
        if not drop:
            await self.pub.send_multipart([self.topic, seq.to_bytes(8, "big"), payload])
        return seq

    def restart(self) -> None:
        self.next_seq = 0
        self.buffer.clear()

    async def _serve_replay(self) -> None:
        while True:
            client, _, start = await self.router.recv_multipart()
            start_seq = int.from_bytes(start, "big")
            self.replay_requests.append(start_seq)
            for seq, payload in self.buffer:
                if seq >= start_seq:
                    await self.router.send_multipart([client, b"", seq.to_bytes(8, "big"), payload])
            await self.router.send_multipart([client, b"", (-1).to_bytes(8, "big", signed=True), b""])

    async def close(self) -> None:
        self._replay_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._replay_task
        self.pub.close(linger=0)
        self.router.close(linger=0)


# --- fixtures


@pytest.fixture
async def zctx() -> AsyncIterator[zmq.asyncio.Context]:
    ctx = zmq.asyncio.Context()
    yield ctx
    ctx.term()


@pytest.fixture
async def engine(zctx: zmq.asyncio.Context) -> AsyncIterator[EnginePublisher]:
    publisher = EnginePublisher(zctx)
    yield publisher
    await publisher.close()


class BusTap:
    """Everything the bridge puts on the bus for one worker, read by a plain NATS subscriber."""

    def __init__(self, nc: Any, subjects: Subjects, worker: str) -> None:
        self.nc = nc
        self.subjects = subjects
        self.worker = worker
        self.batches: asyncio.Queue[KvEventBatch] = asyncio.Queue()
        self.loads: asyncio.Queue[LoadReport] = asyncio.Queue()

    async def start(self) -> None:
        async def on_kv(msg: Any) -> None:
            self.batches.put_nowait(decode(msg.data, KvEventBatch))

        async def on_load(msg: Any) -> None:
            self.loads.put_nowait(decode(msg.data, LoadReport))

        await self.nc.subscribe(self.subjects.kv(self.worker), cb=on_kv)
        await self.nc.subscribe(self.subjects.load(self.worker), cb=on_load)

    async def events(self, count: int) -> list[Any]:
        """The next `count` events, in order, whatever batches carry them."""
        out: list[Any] = []
        while len(out) < count:
            batch = await asyncio.wait_for(self.batches.get(), 10)
            out.extend(batch.events)
        assert len(out) == count, out
        return out

    async def nothing_more(self) -> None:
        await asyncio.sleep(0.2)
        assert self.batches.empty(), self.batches.get_nowait()


@pytest.fixture
async def tap(nats_url: str, namespace: str) -> AsyncIterator[BusTap]:
    nc = await nats.connect(nats_url)
    bus_tap = BusTap(nc, Subjects(namespace), WORKER)
    await bus_tap.start()
    yield bus_tap
    await nc.drain()


@contextlib.asynccontextmanager
async def running_bridge(
    publisher: EnginePublisher, nats_url: str, namespace: str, *, replay: bool, **kw: Any
) -> AsyncIterator[Bridge]:
    config = BridgeConfig(
        zmq_endpoint=publisher.endpoint,
        replay_endpoint=publisher.replay_endpoint if replay else None,
        url=kw.pop("url", "http://127.0.0.1:9"),
        model=kw.pop("model", "meta-llama/Llama-3.1-8B-Instruct"),
        nats_url=nats_url,
        worker_id=kw.pop("worker_id", WORKER),
        block_size=kw.pop("block_size", B),
        namespace=namespace,
        topic="kv-events",
        metrics_interval_s=kw.pop("metrics_interval_s", 0.0),
        health_interval_s=kw.pop("health_interval_s", 0.0),  # no engine answers at the default url
        **kw,
    )
    bridge = Bridge(config)
    task = asyncio.create_task(bridge.run())
    await asyncio.wait_for(bridge.ready.wait(), 10)
    await publisher.wait_subscribed()
    if replay:
        # the bridge's start-up replay must be served before the test publishes: served later, on a
        # loaded box, it replays the test's batches ahead of the live ones, which then look like a
        # restart (a real engine's buffer holds only what it cached before the bridge started)
        await until(lambda: bool(publisher.replay_requests), 30.0, "the bridge's start-up replay")
    try:
        yield bridge
    finally:
        bridge.stop()
        await asyncio.wait_for(task, 10)


async def registered(kv: Any, worker_id: str) -> WorkerRegistration:
    """The worker's registry entry, once its first heartbeat has written it (a bridge process may take
    a while to start on a loaded box)."""
    entries: list[WorkerRegistration] = []

    async def written() -> bool:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            entries.append(decode((await kv.get(worker_id)).value, WorkerRegistration))
        return bool(entries)

    await until(written, 60.0, f"{worker_id}'s registration")
    return entries[0]


# --- tests


async def test_map_layout_is_rehashed_and_removals_map_back(
    engine: EnginePublisher, tap: BusTap, nats_url: str, namespace: str
) -> None:
    ours = block_hashes(TOKENS, B)
    # Unsigned 64-bit engine hashes, above 2**63 as vLLM's low-64-bit digests often are.
    e = [(1 << 63) + 11, (1 << 63) + 22, (1 << 63) + 33, (1 << 63) + 44]
    async with running_bridge(engine, nats_url, namespace, replay=False):
        await engine.send(map_batch(stored(e[:2], None, TOKENS[: 2 * B], extra_keys=[None, None])))
        await engine.send(
            map_batch(stored(e[2:], e[1], TOKENS[2 * B :]), VllmBlockRemoved([e[3], e[0]], "GPU"))
        )
        first, second, removed = await tap.events(3)
        assert first == BlockStored(ours[:2], None, "device")
        assert second == BlockStored(ours[2:], ours[1], "device")
        assert removed == BlockRemoved([ours[3], ours[0]], "device")
        await tap.nothing_more()


async def test_positional_layout_with_signed_and_bytes_hashes(
    engine: EnginePublisher, tap: BusTap, nats_url: str, namespace: str
) -> None:
    # SGLang sends signed int64; older vLLM raw 32-byte digests. A removal may carry the other sign.
    signed_root = -(1 << 62) - 5
    digest = bytes(range(32))
    ours = block_hashes(TOKENS[: 2 * B], B)
    async with running_bridge(engine, nats_url, namespace, replay=False):
        await engine.send(array_batch(ArrayStored([signed_root], None, TOKENS[:B], B, None, "GPU")))
        await engine.send(array_batch(ArrayStored([digest], signed_root, TOKENS[B : 2 * B], B, None, "CPU")))
        await engine.send(array_batch(ArrayRemoved([signed_root & ((1 << 64) - 1), digest], "GPU")))
        stored_root, stored_child, removed = await tap.events(3)
        assert stored_root == BlockStored([ours[0]], None, "device")
        assert stored_child == BlockStored([ours[1]], ours[0], "host")  # offloaded to CPU
        # The child is on the host tier only, so a GPU removal of it is not ours to report.
        assert removed == BlockRemoved([ours[0]], "device")


async def test_lora_seed_and_cleared_and_unknown_events(
    engine: EnginePublisher, tap: BusTap, nats_url: str, namespace: str
) -> None:
    seed = hash_seed("sql-adapter")
    unknown = msgspec.msgpack.encode(
        {"ts": 1.0, "events": [{"type": "BlockPinned", "block_hashes": [1]}, {"type": "AllBlocksCleared"}]}
    )
    async with running_bridge(engine, nats_url, namespace, replay=False) as bridge:
        await engine.send(map_batch(stored([7], None, TOKENS[:B], lora_name="sql-adapter")))
        await engine.send(unknown)
        await engine.send(map_batch(VllmBlockRemoved([7], "GPU")))  # after the clear: nothing to remove
        await engine.send(map_batch(stored([8], None, TOKENS[:B], group_idx=1)))  # another KV group
        first, cleared = await tap.events(2)
        assert first == BlockStored(block_hashes(TOKENS[:B], B, seed), None, "device")
        assert cleared == AllBlocksCleared()
        await tap.nothing_more()
        assert bridge.malformed == 1  # the unknown event type, skipped without losing the batch


async def test_gap_without_replay_clears_the_worker(
    engine: EnginePublisher, tap: BusTap, nats_url: str, namespace: str
) -> None:
    ours = block_hashes(TOKENS, B)
    async with running_bridge(engine, nats_url, namespace, replay=False) as bridge:
        await engine.send(map_batch(stored([1], None, TOKENS[:B])))
        await engine.send(map_batch(stored([2], 1, TOKENS[B : 2 * B])), drop=True)
        await engine.send(map_batch(stored([3], None, TOKENS[: 3 * B][-B:])))
        first, cleared, after = await tap.events(3)
        assert first == BlockStored([ours[0]], None, "device")
        assert cleared == AllBlocksCleared()
        assert after == BlockStored(block_hashes(TOKENS[2 * B : 3 * B], B), None, "device")
        assert bridge.gaps == 1


async def test_gap_with_replay_fills_in_order(
    engine: EnginePublisher, tap: BusTap, nats_url: str, namespace: str
) -> None:
    ours = block_hashes(TOKENS, B)
    async with running_bridge(engine, nats_url, namespace, replay=True) as bridge:
        await engine.send(map_batch(stored([1], None, TOKENS[:B])))
        await engine.send(map_batch(stored([2], 1, TOKENS[B : 2 * B])), drop=True)
        await engine.send(map_batch(stored([3], 2, TOKENS[2 * B : 3 * B])))
        await engine.send(map_batch(VllmBlockRemoved([2, 3], None)))
        events = await tap.events(4)
        assert events == [
            BlockStored([ours[0]], None, "device"),
            BlockStored([ours[1]], ours[0], "device"),  # from the replay
            BlockStored([ours[2]], ours[1], "device"),
            BlockRemoved([ours[1], ours[2]], "device"),
        ]
        await tap.nothing_more()
        assert engine.replay_requests == [0, 1]  # at start (nothing buffered yet), then the gap
        assert bridge.last_seq == 3


async def test_late_start_replays_from_zero(
    engine: EnginePublisher, tap: BusTap, nats_url: str, namespace: str
) -> None:
    ours = block_hashes(TOKENS, B)
    # Sent before the bridge exists: only the replay buffer has them.
    await engine.send(map_batch(stored([1, 2], None, TOKENS[: 2 * B])), drop=True)
    async with running_bridge(engine, nats_url, namespace, replay=True):
        await engine.send(map_batch(stored([3], 2, TOKENS[2 * B : 3 * B])))
        assert await tap.events(2) == [
            BlockStored(ours[:2], None, "device"),
            BlockStored([ours[2]], ours[1], "device"),
        ]
        assert engine.replay_requests == [0]


async def test_engine_restart_clears_and_starts_over(
    engine: EnginePublisher, tap: BusTap, nats_url: str, namespace: str
) -> None:
    ours = block_hashes(TOKENS, B)
    async with running_bridge(engine, nats_url, namespace, replay=True) as bridge:
        await engine.send(map_batch(stored([1], None, TOKENS[:B])))
        await engine.send(map_batch(stored([2], 1, TOKENS[B : 2 * B])))
        engine.restart()
        await engine.send(map_batch(stored([1], None, TOKENS[:B])))
        assert await tap.events(4) == [
            BlockStored([ours[0]], None, "device"),
            BlockStored([ours[1]], ours[0], "device"),
            AllBlocksCleared(),
            BlockStored([ours[0]], None, "device"),
        ]
        assert bridge.restarts == 1
        assert bridge.translator.our_hash(2) is None


async def test_registration_dump_and_bad_input(
    engine: EnginePublisher, tap: BusTap, nats_url: str, namespace: str
) -> None:
    subjects = Subjects(namespace)
    ours = block_hashes(TOKENS, B)
    async with running_bridge(engine, nats_url, namespace, replay=False, engine="sglang") as bridge:
        kv = await tap.nc.jetstream().key_value(subjects.registry_bucket)
        registration = await registered(kv, WORKER)
        assert (registration.engine, registration.block_size, registration.url) == (
            "sglang",
            B,
            "http://127.0.0.1:9",
        )
        assert registration.model == "meta-llama/Llama-3.1-8B-Instruct"

        await engine.pub.send_multipart([b"kv-events", b"\x00"])  # not 3 frames
        await engine.send(b"\xc1 not msgpack")
        await engine.send(map_batch(stored([1], None, TOKENS[:B]), stored([2], 1, TOKENS[B : 3 * B])))
        await engine.send(map_batch(stored([5, 6], None, TOKENS[: 2 * B], medium="CPU")))
        # The second event has 2 blocks of tokens for 1 hash: skipped, the first kept.
        assert await tap.events(2) == [
            BlockStored([ours[0]], None, "device"),
            BlockStored(ours[:2], None, "host"),
        ]
        assert bridge.malformed == 3

        reply = await tap.nc.request(subjects.dump(WORKER), encode(StateDumpRequest("test")), timeout=5)
        dump = decode(reply.data, KvStateDump)
        assert dump.epoch == registration.epoch
        assert {(b.block_hash, b.parent_hash, b.tier) for b in dump.blocks} == {
            (ours[0], None, "device"),
            (ours[0], None, "host"),
            (ours[1], ours[0], "host"),
        }
        # The stream the gateway replays from holds what the tap saw.
        last = await tap.nc.jetstream().get_last_msg(subjects.kv_stream, subjects.kv(WORKER))
        assert decode(last.data, KvEventBatch).events[-1] == BlockStored(ours[:2], None, "host")
    # A clean stop removes the worker from the registry.
    with pytest.raises(nats.js.errors.KeyNotFoundError):
        await kv.get(WORKER)


async def test_block_size_mismatch_is_skipped(
    engine: EnginePublisher, tap: BusTap, nats_url: str, namespace: str
) -> None:
    async with running_bridge(engine, nats_url, namespace, replay=False, block_size=32) as bridge:
        await engine.send(map_batch(stored([1], None, TOKENS[:B])))
        await engine.send(map_batch(VllmAllBlocksCleared()))
        assert await tap.events(1) == [AllBlocksCleared()]
        assert bridge.translator.size_mismatches == 1


def vllm_metrics_page(running: int, waiting: int, usage: float, prompt: int, generated: int = 0) -> bytes:
    registry = CollectorRegistry()
    labels = ["model_name", "engine"]
    Gauge("vllm:num_requests_running", "", labels, registry=registry).labels("m", "0").set(running)
    Gauge("vllm:num_requests_waiting", "", labels, registry=registry).labels("m", "0").set(waiting)
    Gauge("vllm:kv_cache_usage_perc", "", labels, registry=registry).labels("m", "0").set(usage)
    Counter("vllm:prompt_tokens", "", labels, registry=registry).labels("m", "0").inc(prompt)
    Counter("vllm:generation_tokens", "", labels, registry=registry).labels("m", "0").inc(generated)
    info = Gauge("vllm:cache_config_info", "", ["block_size", "num_gpu_blocks"], registry=registry)
    info.labels("16", "2000").set(1)
    return generate_latest(registry)


async def next_load(
    tap: BusTap, want: Callable[[LoadReport], bool], earlier: set[tuple[int, int]]
) -> LoadReport:
    """The first load report `want` accepts; those before it may only carry an earlier state (the
    Publisher reports on its own clock: it repeats the last scrape's load until the next one)."""
    while not want(report := await asyncio.wait_for(tap.loads.get(), 30)):
        assert (report.running, report.waiting) in earlier, report
    return report


async def test_load_reports_from_engine_metrics(
    engine: EnginePublisher, tap: BusTap, nats_url: str, namespace: str
) -> None:
    # The engine's page changes only when the test has seen the bus report the previous one: the bridge
    # scrapes and the Publisher reports on two clocks, so a page served for one scrape only could be
    # replaced before any report carried it.
    seen_first = asyncio.Event()
    later_scrapes = itertools.count()

    async def metrics(_: web.Request) -> web.Response:
        if not seen_first.is_set():
            return web.Response(body=vllm_metrics_page(3, 2, 0.25, 1000), content_type="text/plain")
        # each later scrape finds 2000 more prompt tokens than the one before
        page = vllm_metrics_page(4, 1, 0.5, 3000 + 2000 * next(later_scrapes), 50)
        return web.Response(body=page, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    async with (
        serving(app) as url,
        running_bridge(engine, nats_url, namespace, replay=False, url=url, metrics_interval_s=0.05),
    ):
        await engine.send(map_batch(stored([1], None, TOKENS[:B])))
        assert await tap.events(1) == [BlockStored(block_hashes(TOKENS[:B], B), None, "device")]
        first = await next_load(tap, lambda r: r.running != 0, {(0, 0)})  # (0, 0): before a scrape
        seen_first.set()
        second = await next_load(tap, lambda r: r.running == 4, {(0, 0), (3, 2)})
        # Tokens were generated and nothing new was cached: the next heartbeat says events still
        # flow with an empty batch, so the gateway keeps routing this worker on its events.
        alive = await asyncio.wait_for(tap.batches.get(), 30)
        assert alive.events == []
    assert (first.running, first.waiting, first.used_blocks, first.total_blocks) == (3, 2, 500, 2000)
    assert (second.running, second.waiting, second.used_blocks) == (4, 1, 1000)
    assert second.prefill_tok_s > 0  # 2000 prompt tokens between any two scrapes


def test_parse_sglang_metrics() -> None:
    registry = CollectorRegistry()
    Gauge("sglang:num_running_reqs", "", ["model_name"], registry=registry).labels("m").set(5)
    Gauge("sglang:num_queue_reqs", "", ["model_name"], registry=registry).labels("m").set(7)
    Gauge("sglang:token_usage", "", ["model_name"], registry=registry).labels("m").set(0.125)
    metrics = parse_metrics(generate_latest(registry).decode())
    assert (metrics.running, metrics.waiting, metrics.kv_usage, metrics.num_blocks) == (5, 7, 0.125, 0)


def test_decode_rejects_garbage() -> None:
    for bad in (b"\xc1", msgspec.msgpack.encode(42), msgspec.msgpack.encode({"ts": "x", "events": []})):
        with pytest.raises(WireError):
            decode_batch(bad)


def test_translator_skips_orphans_and_maps_hash_signs() -> None:
    translator = EventTranslator(B)
    batch = decode_batch(map_batch(stored([99], 12345, TOKENS[:B])))  # parent never seen
    assert translator.translate(batch.events) == []
    assert translator.skipped_blocks == 1
    translator.translate(decode_batch(map_batch(stored([-1], None, TOKENS[:B]))).events)
    assert translator.our_hash((1 << 64) - 1) == block_hashes(TOKENS[:B], B)[0]


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["bridge", "--zmq", "tcp://127.0.0.1:1", "--url", "http://x:8000", "--model", "m"]
    base += ["--nats", "nats://127.0.0.1:1"]
    assert kvgate_main([*base, "--worker-id", "has.dot"]) == 2
    assert "worker id" in capsys.readouterr().out
    assert kvgate_main([*base, "--block-size", "0"]) == 2
    for flag, bad in (("--zmq", "127.0.0.1:5557"), ("--url", "vllm:8000"), ("--nats", "http://n:4222")):
        args = [*base, "--worker-id", "w"]
        args[args.index(flag) + 1] = bad
        assert kvgate_main(args) == 2
        assert flag in capsys.readouterr().out


def test_translator_bounds_what_it_tracks() -> None:
    translator = EventTranslator(B, max_blocks=2)
    ours = block_hashes(TOKENS, B)
    first = translator.translate(decode_batch(map_batch(stored([1, 2], None, TOKENS[: 2 * B]))).events)
    assert first == [BlockStored(ours[:2], None, "device")]
    # A third block means removals went missing: start over rather than grow without bound.
    third = translator.translate(decode_batch(map_batch(stored([3], 2, TOKENS[2 * B : 3 * B]))).events)
    assert third == [AllBlocksCleared()]
    assert len(translator) == 0


# --- end to end: vLLM-wire events through the bridge steer the real gateway


def gateway_saw_events_of(gateway_url: str, worker_id: str) -> bool:
    with urllib.request.urlopen(gateway_url + "/metrics", timeout=2) as resp:
        text = resp.read().decode()
    return f'kvgate_worker_event_lag_seconds{{worker="{worker_id}"}}' in text


async def eventually(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """`until` for a blocking check (HTTP to a subprocess): each try runs in a thread."""
    await until(lambda: asyncio.to_thread(check), timeout_s, what)


@pytest.mark.slow
async def test_gateway_routes_on_bridged_engine_events(
    zctx: zmq.asyncio.Context, nats_url: str, namespace: str, tmp_path: Any
) -> None:
    model = "vllm-sim"
    # Two OpenAI-compatible servers that publish nothing themselves (kvgate mock workers without
    # --nats) stand in for vLLM's HTTP side; their KV events come from vLLM-wire publishers.
    servers: dict[str, Proc] = {}
    engines: dict[str, EnginePublisher] = {}
    for name in ("vllm-a", "vllm-b"):
        port = free_port()
        argv = ["worker", "--engine", "mock", "--port", str(port), "--model", model, "--worker-id", name]
        servers[name] = Proc(argv, f"http://127.0.0.1:{port}", tmp_path / f"{name}.log")
        engines[name] = EnginePublisher(zctx)
    port = free_port()
    gateway = Proc(
        ["gateway", "--nats", nats_url, "--port", str(port), "--namespace", namespace],
        f"http://127.0.0.1:{port}",
        tmp_path / "gateway.log",
    )
    messages = [
        {"role": "system", "content": "You are a careful coding agent. Use the tools. " * 8},
        {"role": "user", "content": "List the files in the repository."},
    ]
    tokens = encode_chat(messages, ByteTokenizer())
    k = len(tokens) // B - 1
    assert k >= 4
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)

    async def route() -> tuple[str, int]:
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=messages, max_tokens=1, extra_headers={"x-session-id": uuid.uuid4().hex}
        )
        raw.parse()
        return raw.headers["x-kvgate-worker"], int(raw.headers["x-kvgate-cached-tokens-expected"])

    try:
        async with contextlib.AsyncExitStack() as stack:
            for name, server in servers.items():
                await asyncio.to_thread(server.wait_http, "/health", 60)
                bridge_kw = {"worker_id": name, "url": server.url, "model": model}
                await stack.enter_async_context(
                    running_bridge(engines[name], nats_url, namespace, replay=True, **bridge_kw)
                )
            await eventually(lambda: (http_get(gateway.url + "/ready")[1] or {}).get("workers") == 2, "ready")

            # Engine B caches the prompt's first k blocks: the gateway sends the turn there.
            await engines["vllm-b"].send(map_batch(stored(list(range(1, k + 1)), None, tokens[: k * B])))
            await eventually(lambda: gateway_saw_events_of(gateway.url, "vllm-b"), "B's events")
            assert await route() == ("vllm-b", k * B)

            # B evicts them (removals by vLLM's hashes), A caches them: the next turn goes to A.
            await engines["vllm-b"].send(map_batch(VllmBlockRemoved(list(range(1, k + 1)), "GPU")))
            nc = await nats.connect(nats_url)
            subjects = Subjects(namespace)

            async def b_removal_on_the_stream() -> bool:
                last = await nc.jetstream().get_last_msg(subjects.kv_stream, subjects.kv("vllm-b"))
                return isinstance(decode(last.data, KvEventBatch).events[-1], BlockRemoved)

            await until(b_removal_on_the_stream, 30.0, "B's removal on the KV stream")
            await nc.close()
            # The gateway reads the stream in order: B's removal is applied before A's store.
            await engines["vllm-a"].send(map_batch(stored(list(range(101, 101 + k)), None, tokens[: k * B])))
            await eventually(lambda: gateway_saw_events_of(gateway.url, "vllm-a"), "A's events")
            assert await route() == ("vllm-a", k * B)
    finally:
        await client.close()
        for proc in (gateway, *servers.values()):
            proc.stop()
        for engine_publisher in engines.values():
            await engine_publisher.close()


@pytest.mark.slow
async def test_bridge_process_registers_and_deregisters_on_sigterm(
    engine: EnginePublisher, nats_url: str, namespace: str, tmp_path: Any
) -> None:
    argv = [
        "bridge", "--zmq", engine.endpoint, "--replay", engine.replay_endpoint, "--url", "http://vllm-0:8000",
        "--model", "m", "--nats", nats_url, "--namespace", namespace, "--worker-id", WORKER,
        "--metrics-interval", "0",
    ]  # fmt: skip
    proc = Proc(argv, "http://unused", tmp_path / "bridge.log")
    nc = await nats.connect(nats_url)
    try:
        await engine.wait_subscribed()
        js = nc.jetstream()
        buckets: list[Any] = []

        async def bucket_made() -> bool:  # the bucket appears with the bridge's set-up
            with contextlib.suppress(nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
                buckets.append(await js.key_value(Subjects(namespace).registry_bucket))
            return bool(buckets)

        await until(bucket_made, 60.0, "the registry bucket")
        kv = buckets[0]
        registration = await registered(kv, WORKER)
        assert (registration.url, registration.engine) == ("http://vllm-0:8000", "vllm")
        proc.proc.terminate()
        assert await asyncio.to_thread(proc.proc.wait, 15) == 0
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await kv.get(WORKER)
    finally:
        proc.stop()
        await nc.close()


async def test_an_engine_that_stops_answering_leaves_the_bus_and_comes_back(
    engine: EnginePublisher, tap: BusTap, nats_url: str, namespace: str
) -> None:
    """3 failed health checks (0.2 s apart): deregistered and its blocks cleared; answering again:
    registered again, with no blocks until it stores new ones."""

    async def ok(_request: web.Request) -> web.Response:
        return web.json_response({})

    health = web.Application()
    health.router.add_get("/health", ok)
    port = free_port()
    engine_server = contextlib.AsyncExitStack()  # the engine's /health, stopped and served again
    await engine_server.enter_async_context(serving(health, port))
    nc = await nats.connect(nats_url)

    async def registered() -> bool:
        try:  # the bucket appears with the bridge
            kv = await nc.jetstream().key_value(Subjects(namespace).registry_bucket)
            return (await kv.get(WORKER)).value is not None
        except Exception:
            return False

    async def until(want: bool, timeout_s: float) -> float:
        started = time.monotonic()
        while await registered() != want:
            assert time.monotonic() - started < timeout_s, f"registered should be {want}"
            await asyncio.sleep(0.05)
        return time.monotonic() - started

    try:
        async with running_bridge(
            engine, nats_url, namespace, replay=False, url=f"http://127.0.0.1:{port}",
            health_interval_s=0.2, heartbeat_s=0.2,
        ) as bridge:  # fmt: skip
            await until(True, 30)
            await engine.send(map_batch(stored([1], None, TOKENS[:B])))
            assert len(await tap.events(1)) == 1
            await engine_server.aclose()  # the engine is gone: connections closed, then refused
            # Out of the pick after 3 failed checks (here 3 x 0.2 s), deleted by the bridge: a registry
            # entry left to lapse would stay 60 s. 30 s leaves a loaded machine room.
            await until(False, 30)
            assert bridge.engine_down and await tap.events(1) == [AllBlocksCleared()]
            await engine_server.enter_async_context(serving(health, port))
            await until(True, 30)
            assert not bridge.engine_down and bridge.translator.cached_blocks() == []
    finally:
        await nc.close()
        await engine_server.aclose()


async def test_sglang_hicache_tiers_reach_the_index_and_bad_bytes_are_dropped(
    engine: EnginePublisher, tap: BusTap, nats_url: str, namespace: str
) -> None:
    """SGLang's positional events (`[ts, events, attn_dp_rank]`, stores ending at `medium`, see
    tests/engines/test_bridge_tiers.py) through the bridge process's loop and the bus into a BlockIndex:
    a HiCache host copy lands on "host", a device eviction leaves it there; garbage and an unknown
    medium are counted and dropped, and the bridge goes on."""
    ours = block_hashes(TOKENS, B)
    h = [-(1 << 62) - i for i in range(4)]  # SGLang's signed int64 hashes

    def sglang(*events: list[Any]) -> bytes:  # what msgspec makes of SGLang's array_like structs
        return msgspec.msgpack.encode([time.time(), list(events), 0])

    index = BlockIndex()
    index.add_worker(WORKER, 1 << 20)
    async with running_bridge(engine, nats_url, namespace, replay=False, engine="sglang") as bridge:
        await engine.send(sglang(["BlockStored", h, None, TOKENS, B, None, "GPU"]))
        await engine.send(b"\x93\xcb garbage")  # cut short: not msgpack
        await engine.send(sglang(["BlockStored", h, None, TOKENS, B, None, "CPU_PINNED"]))
        await engine.send(sglang(["BlockStored", h[:1], None, TOKENS[:B], B, None, "EXTERNAL"]))
        await engine.send(sglang(["BlockRemoved", h[2:], "GPU"]))
        events = await tap.events(3)
        await tap.nothing_more()
        assert (bridge.malformed, bridge.translator.unplaced_blocks) == (1, 1)
    index.apply(WORKER, events)
    assert index.overlap(ours, "device") == {WORKER: 2}
    assert index.overlap(ours, "host") == {WORKER: 4}
    assert index.reach(ours, "host") == {WORKER: 4}
