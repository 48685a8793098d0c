"""Publisher against a real nats-server, in process: batch numbering, replay exactness, the empty
"events still flow" batch, the gap a dropped backlog leaves, and a stop that is bounded whatever the
server does."""

from __future__ import annotations

import asyncio
import logging
import math
import os
import signal
import time
from collections.abc import AsyncIterator, Callable

import nats
import pytest

from engines import publisher as publisher_module
from engines.engine import Engine, EngineConfig, EngineRequest
from engines.loop import EngineLoop
from engines.mock import MockRunner
from engines.publisher import Publisher
from engines.runner import SamplingParams
from gateway.natsd import NatsServer
from router.protocol import (
    MAX_SESSION_ID_CHARS,
    BlockStored,
    KvEventBatch,
    PinHint,
    Subjects,
    WorkerRegistration,
    decode,
    encode,
)
from tests.engines.holding_proxy import HoldingProxy
from tests.engines.kv_replay import ReplayedCache

Setup = tuple[EngineLoop, Publisher, list[KvEventBatch]]


def registration() -> WorkerRegistration:
    return WorkerRegistration("pw", "http://127.0.0.1:1", "mock", 4, 32, "mock", 42, time.time())


@pytest.fixture
async def setup(nats_url: str, namespace: str) -> AsyncIterator[Setup]:
    engine = Engine(EngineConfig(num_blocks=32, block_size=4), MockRunner(32, 4, speedup=1000))
    loop = EngineLoop(engine, threaded=False)
    subjects = Subjects(namespace)
    publisher = Publisher(nats_url, subjects, loop, registration, heartbeat_interval_s=0.2)
    loop.start()
    await publisher.start()
    await asyncio.wait_for(publisher.ready.wait(), 10)
    nc = await nats.connect(nats_url)
    batches: list[KvEventBatch] = []

    async def on_kv(msg: nats.aio.msg.Msg) -> None:
        batches.append(decode(msg.data, KvEventBatch))

    await nc.jetstream().subscribe(
        subjects.kv_all, stream=subjects.kv_stream, ordered_consumer=True, cb=on_kv
    )
    yield loop, publisher, batches
    await nc.close()
    await publisher.stop()
    await loop.stop()


async def run(loop: EngineLoop, rid: str, tokens: list[int], max_tokens: int) -> None:
    queue = await loop.submit(
        EngineRequest(rid, tokens, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    )
    while not (await queue.get()).finished:
        pass


async def settle(check: Callable[[], object], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


async def test_batches_are_numbered_and_replay_to_the_cached_set(setup: Setup) -> None:
    loop, publisher, batches = setup
    for i in range(40):  # 32 blocks: later prompts evict earlier ones
        await run(loop, f"r{i}", [i % 9] * 6 + list(range(i, i + 11)), max_tokens=3)
    # every event taken into a batch (none left pending) and the last batch received
    await settle(lambda: not publisher._pending and batches and batches[-1].seq == publisher.next_seq - 1)
    assert [b.seq for b in batches] == list(range(len(batches)))
    assert {(b.worker_id, b.epoch) for b in batches} == {("pw", 42)}
    replay = ReplayedCache()
    for batch in batches:
        replay.apply(batch.events)
    assert replay.blocks == {b.block_hash: b.parent_hash for b in loop.engine.cached_blocks()}
    assert any(not isinstance(e, BlockStored) for b in batches for e in b.events)  # evictions seen


async def test_a_request_that_changes_nothing_still_yields_a_batch(setup: Setup) -> None:
    loop, _publisher, batches = setup
    prompt = list(range(9))  # 2 full blocks and 1 token
    await run(loop, "a", prompt, max_tokens=1)
    await settle(lambda: len(batches) == 1)
    await asyncio.sleep(0.5)
    assert len(batches) == 1  # idle: no empty batches
    await run(loop, "b", prompt, max_tokens=1)  # full hit, one output token: no new full block
    await settle(lambda: len(batches) == 2)
    assert batches[1].events == [] and batches[1].seq == 1


async def test_a_dropped_backlog_leaves_a_sequence_gap(setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    loop, _publisher, batches = setup
    monkeypatch.setattr(publisher_module, "MAX_PENDING_EVENTS", 0)
    await run(loop, "lost", list(range(50, 59)), max_tokens=1)
    monkeypatch.setattr(publisher_module, "MAX_PENDING_EVENTS", 100)
    await run(loop, "kept", list(range(70, 79)), max_tokens=1)
    await settle(lambda: len(batches) >= 1)
    assert batches[0].seq >= 1  # seq 0 was burnt: a subscriber sees the gap and asks for a dump


STOP_TIMEOUT_S = 1.0
# scheduling on a loaded 2-core CI machine, not part of the contract; an unbounded stop waits 30 s (a
# frozen server's ack, the injected reply) or for ever, so the bound still tells them apart
STOP_SLACK_S = 8.0


async def start_publisher(nats_url: str, namespace: str) -> tuple[EngineLoop, Publisher]:
    engine = Engine(EngineConfig(num_blocks=32, block_size=4), MockRunner(32, 4, speedup=1000))
    loop = EngineLoop(engine, threaded=False)
    publisher = Publisher(
        nats_url,
        Subjects(namespace),
        loop,
        registration,
        heartbeat_interval_s=0.2,
        stop_timeout_s=STOP_TIMEOUT_S,
    )
    loop.start()
    await publisher.start()
    await asyncio.wait_for(publisher.ready.wait(), 10)
    return loop, publisher


async def timed_stop(publisher: Publisher) -> float:
    started = time.monotonic()
    await asyncio.wait_for(publisher.stop(), 30)  # a hang fails here rather than at pytest's timeout
    return time.monotonic() - started


@pytest.mark.slow
async def test_stop_is_bounded_while_a_publish_is_in_flight_to_a_frozen_server(namespace: str) -> None:
    with NatsServer() as server:
        loop, publisher = await start_publisher(server.url, namespace)
        try:
            await run(loop, "warm", list(range(9)), max_tokens=1)
            await asyncio.sleep(0.5)  # past a heartbeat: its empty "events flow" batch is out too
            await settle(lambda: publisher.batches_published == publisher.next_seq)
            assert server._proc is not None  # no public pid: freezing the process holds a publish's ack
            os.kill(server._proc.pid, signal.SIGSTOP)
            try:
                # counted once frozen: a heartbeat batch may have been acked between the settle and the
                # freeze (seen on a loaded machine); none can be acked from now on
                await asyncio.sleep(0.2)
                published = publisher.batches_published
                taken = publisher.next_seq
                await run(loop, "stuck", list(range(20, 29)), max_tokens=1)
                await settle(lambda: publisher.next_seq > taken)  # taken: its publish awaits the ack
                assert publisher.batches_published == published and publisher.nc is not None
                assert publisher.nc.is_connected  # the TCP connection lives: every request waits
                elapsed = await timed_stop(publisher)
            finally:
                os.kill(server._proc.pid, signal.SIGCONT)
            assert elapsed < STOP_TIMEOUT_S + STOP_SLACK_S
            assert publisher.nc is None
            assert publisher._tasks == []  # every task ended, none left running behind
        finally:
            await loop.stop()


@pytest.mark.slow
async def test_stop_is_bounded_after_the_server_went_away(namespace: str) -> None:
    with NatsServer() as server:
        loop, publisher = await start_publisher(server.url, namespace)
        try:
            nc = publisher.nc
            assert nc is not None
            server.stop()
            await settle(lambda: not nc.is_connected)
            await run(loop, "orphan", list(range(40, 49)), max_tokens=1)  # a publish into the outage
            await asyncio.sleep(0.3)  # heartbeat and load report attempts are now in flight too
            elapsed = await timed_stop(publisher)
            assert elapsed < STOP_TIMEOUT_S + STOP_SLACK_S
            assert nc.is_closed  # closed, not left reconnecting forever
            assert publisher._tasks == []
        finally:
            await loop.stop()


async def test_stop_survives_a_cancel_lost_inside_nats_py(
    nats_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Python 3.11's asyncio.wait_for, inside nats-py, returns normally when its reply lands as the
    cancel arrives: the load loop then runs on. Injected here on the real client, deterministically:
    before, stop() awaited that loop forever."""
    loop, publisher = await start_publisher(nats_url, namespace)
    nc = publisher.nc
    assert nc is not None
    real_publish = nc.publish
    load_subject = Subjects(namespace).load("pw")
    inside = asyncio.Event()
    lost: list[int] = []

    async def publish_losing_the_cancel(subject: str, *args: object, **kwargs: object) -> None:
        if subject == load_subject and not lost:
            inside.set()
            try:
                await asyncio.sleep(30)  # a reply that takes its time
            except asyncio.CancelledError:
                lost.append(1)  # ...and lands together with the cancel
        await real_publish(subject, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(nc, "publish", publish_losing_the_cancel)
    try:
        await asyncio.wait_for(inside.wait(), 5)
        elapsed = await timed_stop(publisher)
        assert lost == [1]
        assert elapsed < STOP_TIMEOUT_S + STOP_SLACK_S
        assert publisher._tasks == []  # the second cancel ended the loop
    finally:
        await loop.stop()


async def test_stop_deregisters_the_worker(nats_url: str, namespace: str) -> None:
    loop, publisher = await start_publisher(nats_url, namespace)
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(Subjects(namespace).registry_bucket)
        deadline = time.monotonic() + 30.0
        while True:  # `ready` comes before the first heartbeat has written the registration
            try:
                entry = await kv.get("pw")
                break
            except nats.js.errors.KeyNotFoundError:
                assert time.monotonic() < deadline, "the worker never registered"
                await asyncio.sleep(0.05)
        assert decode(entry.value, WorkerRegistration).worker_id == "pw"
        await publisher.stop()
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await kv.get("pw")
    finally:
        await nc.close()
        await loop.stop()


async def test_its_own_stop_is_not_logged_as_a_lost_connection(
    nats_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """nats-py calls the disconnect callback when the publisher closes its own connection: a worker's
    shutdown must not warn that NATS was lost."""
    loop, publisher = await start_publisher(nats_url, namespace)
    try:
        with caplog.at_level(logging.INFO, logger="kvgate.publisher"):
            await publisher.stop()
        assert not [r for r in caplog.records if "disconnected" in r.getMessage()]
    finally:
        await loop.stop()


async def test_a_pin_hint_sent_once_the_worker_is_ready_is_taken(nats_url: str, namespace: str) -> None:
    """`ready` (and the registration after it) must mean the server has the pin subscription: a hint
    published before it does is dropped by the server. The proxy holds the worker's subscription until
    the test has published, or for 3 s once the worker waits on an answer, so a `ready` that does not
    wait for the server's answer fails here every time (the race it stands for lost about one hint in
    ten on a loaded machine)."""
    server_host, server_port = nats_url.removeprefix("nats://").rsplit(":", 1)
    subjects = Subjects(namespace)
    proxy = HoldingProxy(server_host, int(server_port), subjects.dump("pw"))
    engine = Engine(EngineConfig(num_blocks=32, block_size=4), MockRunner(32, 4, speedup=1000))
    loop = EngineLoop(engine, threaded=False)
    publisher = Publisher(await proxy.start(), subjects, loop, registration, heartbeat_interval_s=0.2)
    loop.start()
    await publisher.start()
    nc = await nats.connect(nats_url)
    try:
        await asyncio.wait_for(publisher.ready.wait(), 30)
        await nc.publish(subjects.pin("pw"), encode(PinHint("once", [1, 2], 60.0)))  # once, not again
        await nc.flush()  # the server has routed it, or dropped it for want of a subscriber
        proxy.release()  # from here on nothing waits in the proxy
        await settle(lambda: "once" in loop.engine.block_manager.pins.sessions(), 30.0)
    finally:
        await nc.close()
        await publisher.stop()
        await loop.stop()
        await proxy.close()


async def test_a_pin_hint_with_a_nan_ttl_pins_nothing(setup: Setup, nats_url: str) -> None:
    # NaN passes every clamp (max(nan, 0.0) is nan): such a pin never expired, its blocks held for good
    loop, publisher, _ = setup
    nc = await nats.connect(nats_url)
    subject = publisher.subjects.pin(publisher.worker_id)
    pins = loop.engine.block_manager.pins
    await nc.publish(subject, encode(PinHint("nan", [1, 2, 3], math.nan)))
    await nc.publish(subject, encode(PinHint("finite", [4, 5], 60.0)))  # taken after the first
    await nc.flush()
    await settle(lambda: "finite" in pins.sessions(), 30.0)
    assert list(pins.sessions()) == ["finite"]
    await nc.close()


async def test_a_pin_hint_with_an_overlong_session_id_is_ignored(setup: Setup, nats_url: str) -> None:
    """Each pinned session costs the worker its id, and a hint's id could be a whole message long
    (a pin per block: half the device's blocks, each a megabyte)."""
    loop, publisher, _ = setup
    nc = await nats.connect(nats_url)
    subject = publisher.subjects.pin(publisher.worker_id)
    pins = loop.engine.block_manager.pins
    await nc.publish(subject, encode(PinHint("x" * (MAX_SESSION_ID_CHARS + 1), [1, 2, 3], 60.0)))
    await nc.publish(subject, encode(PinHint("s" * MAX_SESSION_ID_CHARS, [4, 5], 60.0)))  # taken after
    await nc.flush()
    await settle(lambda: "s" * MAX_SESSION_ID_CHARS in pins.sessions(), 30.0)
    assert list(pins.sessions()) == ["s" * MAX_SESSION_ID_CHARS]
    await nc.close()


async def test_a_flood_of_prefetch_hints_stays_under_its_cap(
    nats_url: str, namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(publisher_module, "MAX_PREFETCH_HASHES", 12)
    config = EngineConfig(num_blocks=32, block_size=4, host_blocks=64)
    loop = EngineLoop(Engine(config, MockRunner(32, 4, speedup=1000)), threaded=False)
    publisher = Publisher(nats_url, Subjects(namespace), loop, registration, heartbeat_interval_s=0.2)
    loop.start()
    await publisher.start()
    nc = await nats.connect(nats_url)
    subject = publisher.subjects.pin(publisher.worker_id)

    async def hint(session: str, hashes: list[int]) -> None:
        await nc.publish(subject, encode(PinHint(session, hashes, 60.0, prefetch_after_s=3600.0)))

    try:
        await asyncio.wait_for(publisher.ready.wait(), 10)
        for n in range(300):  # distinct sessions, 5 blocks each, due in an hour: all pending at once
            await hint(f"s{n}", [n, n + 1, n + 2, n + 3, n + 4])
        await nc.flush()
        await settle(lambda: publisher.pending_prefetches == ["s298", "s299"], 30.0)  # 10 of 12 hashes
        assert publisher._prefetch_hashes == 10
        await hint("long", list(range(100)))
        await nc.flush()
        await settle(lambda: publisher.pending_prefetches == ["long"], 30.0)  # alone: cut to 12
        assert publisher._prefetch_hashes == 12
        await hint("a", [1, 2, 3, 4, 5])
        await nc.flush()
        await settle(lambda: publisher.pending_prefetches == ["a"], 30.0)  # the oldest went
        assert publisher._prefetch_hashes == 5
        monkeypatch.setattr(publisher_module, "MAX_PREFETCH_SESSIONS", 3)
        for n in range(5):  # one block each: within the hashes, past the sessions
            await hint(f"one{n}", [n])
        await nc.flush()
        await settle(lambda: publisher.pending_prefetches == ["one2", "one3", "one4"], 30.0)
    finally:
        await nc.close()
        await publisher.stop()
        await loop.stop()
