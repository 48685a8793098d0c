"""The bridge's tests' fixtures: a vLLM-wire engine publisher, a tap on the bus, a running bridge."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest
import zmq.asyncio

from engines.bridge import Bridge, BridgeConfig
from router.protocol import KvEventBatch, LoadReport, Subjects, WorkerRegistration, decode
from tests.engines.bridge.engine_wire import WORKER, B, EnginePublisher
from tests.polling import until

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
