"""Reading the worker registry on a real nats-server: every live key, none deleted, purged or past
the limit; and the bus and index recovery register every worker even when nats-py's watch says
"no more initial values" before the values (what it does on a busy machine; forced here)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError
from nats.js.kv import KeyValue

from gateway.bus import Bus
from gateway.metrics import GatewayMetrics
from gateway.registry_read import read_registry
from gateway.snapshot import IndexRecovery
from router.protocol import Subjects, WorkerRegistration, encode
from router.router import Router
from tests.polling import until

WORKERS = [f"w{i}" for i in range(8)]


def registration(worker: str) -> bytes:
    return encode(WorkerRegistration(worker, "http://127.0.0.1:1", "m", 16, 100, "mock", 1, time.time()))


@pytest.fixture
async def registry(nc: NATS, namespace: str) -> KeyValue:
    kv = await nc.jetstream().create_key_value(bucket=Subjects(namespace).registry_bucket, history=1)
    for worker in WORKERS:
        await kv.put(worker, registration(worker))
    return kv


async def test_every_live_key_in_key_order_and_none_deleted_purged_or_past_the_limit(
    nc: NATS, namespace: str, registry: KeyValue
) -> None:
    bucket = Subjects(namespace).registry_bucket
    await registry.put("w3", registration("w3"))  # a heartbeat: still one entry
    await registry.delete("w5")
    await registry.purge("w6")
    read = await read_registry(nc.jetstream(), bucket, limit=100)
    assert [key for key, _ in read] == ["w0", "w1", "w2", "w3", "w4", "w7"]
    assert dict(read)["w0"] == (await registry.get("w0")).value
    assert [key for key, _ in await read_registry(nc.jetstream(), bucket, limit=3)] == ["w0", "w1", "w2"]
    with pytest.raises(NotFoundError):
        await read_registry(nc.jetstream(), bucket + "-none", limit=100)


class MarkerFirst:
    """A watch whose end-of-initial-values marker (None) comes before the values, as nats-py's does
    when the server has pushed the values but the client has not read them yet."""

    def __init__(self, watcher: Any) -> None:
        self.watcher = watcher
        self.sent_marker = False

    def __aiter__(self) -> MarkerFirst:
        return self

    async def __anext__(self) -> Any:
        if not self.sent_marker:
            self.sent_marker = True
            return None
        entry = None
        while entry is None:  # its own marker, now late
            entry = await self.watcher.__anext__()
        return entry


async def test_the_bus_has_every_worker_when_it_says_the_registry_is_read(
    nats_url: str, namespace: str, registry: KeyValue, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_watchall: Callable[..., Awaitable[Any]] = KeyValue.watchall

    async def marker_first(self: KeyValue, **kwargs: Any) -> MarkerFirst:
        return MarkerFirst(await real_watchall(self, **kwargs))

    monkeypatch.setattr(KeyValue, "watchall", marker_first)
    router = Router(policy="session_kv")
    bus = Bus(nats_url, Subjects(namespace), router, GatewayMetrics(), stale_after_s=30.0)
    at_synced: list[list[str]] = []

    class Synced(asyncio.Event):
        def set(self) -> None:  # what the KV event feed and index recovery find when they go on
            at_synced.append(sorted(router.workers()))
            super().set()

    bus.registry_synced = Synced()
    await bus.start()
    try:
        await until(bus.registry_synced.is_set, 10.0, "the registry read")
        assert at_synced[0] == WORKERS
    finally:
        await bus.stop()


async def test_index_recovery_registers_every_worker_when_keys_come_back_short(
    nc: NATS, namespace: str, registry: KeyValue, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def short_keys(self: KeyValue, *args: Any, **kwargs: Any) -> list[str]:
        return WORKERS[:1]  # what nats-py's keys() returns when its marker overtakes the values

    monkeypatch.setattr(KeyValue, "keys", short_keys)
    router = Router(policy="session_kv")
    recovery = IndexRecovery(nc, Subjects(namespace), router, stale_after_s=30.0)
    assert sorted(await recovery.register_workers()) == WORKERS
    assert sorted(router.workers()) == WORKERS
