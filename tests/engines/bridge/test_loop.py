"""The bridge as a worker on the bus: its registration and state dump, bad input, and an engine that
stops answering health checks and comes back."""

from __future__ import annotations

import contextlib
import logging

import nats
import pytest
from aiohttp import web

from gateway.natsd import free_port
from router.hashing import block_hashes
from router.protocol import (
    AllBlocksCleared,
    BlockStored,
    KvEventBatch,
    KvStateDump,
    PinHint,
    StateDumpRequest,
    Subjects,
    decode,
    encode,
)
from tests.engines.bridge.conftest import BusTap, registered, running_bridge
from tests.engines.bridge.engine_wire import TOKENS, WORKER, B, EnginePublisher, map_batch, stored
from tests.polling import until
from tests.serving import serving


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


async def test_an_engine_that_stops_answering_leaves_the_bus_and_comes_back(
    engine: EnginePublisher, tap: BusTap, nats_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """3 failed health checks (0.2 s apart): deregistered and its blocks cleared; answering again:
    registered again, with no blocks until it stores new ones. The engine's URL carries a password,
    which no log line shows."""
    caplog.set_level(logging.DEBUG)

    async def ok(_request: web.Request) -> web.Response:
        return web.json_response({})

    health = web.Application()
    health.router.add_get("/health", ok)
    port = free_port()
    engine_server = contextlib.AsyncExitStack()  # the engine's /health, stopped and served again
    await engine_server.enter_async_context(serving(health, port))
    nc = await nats.connect(nats_url)

    async def is_registered() -> bool:
        try:  # the bucket appears with the bridge
            kv = await nc.jetstream().key_value(Subjects(namespace).registry_bucket)
            return (await kv.get(WORKER)).value is not None
        except nats.js.errors.NotFoundError:  # no bucket yet, or no entry (deleted: KeyDeletedError)
            return False

    async def registration_is(want: bool) -> None:
        async def reached() -> bool:
            return await is_registered() == want

        await until(reached, 30.0, f"registered == {want}")

    try:
        async with running_bridge(
            engine, nats_url, namespace, replay=False, url=f"http://user:hunter2@127.0.0.1:{port}",
            health_interval_s=0.2, heartbeat_s=0.2,
        ) as bridge:  # fmt: skip
            await registration_is(True)
            await engine.send(map_batch(stored([1], None, TOKENS[:B])))
            assert len(await tap.events(1)) == 1
            await engine_server.aclose()  # the engine is gone: connections closed, then refused
            # Out of the pick after 3 failed checks (here 3 x 0.2 s), deleted by the bridge: a registry
            # entry left to lapse would stay 60 s. 30 s leaves a loaded machine room.
            await registration_is(False)
            assert bridge.engine_down and await tap.events(1) == [AllBlocksCleared()]
            await engine_server.enter_async_context(serving(health, port))
            await registration_is(True)
            assert not bridge.engine_down and bridge.translator.cached_blocks() == []
        logged = [record.getMessage() for record in caplog.records]
        assert any("http://***@127.0.0.1" in line and "health checks" in line for line in logged)
        assert not any("hunter2" in line for line in logged)
    finally:
        await nc.close()
        await engine_server.aclose()


async def test_pin_hints_are_acknowledged_and_ignored(
    engine: EnginePublisher, tap: BusTap, nats_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """vLLM and SGLang take no pins: a hint the gateway sends a bridged worker (a prefetch one too) is
    dropped without an error, and the bridge goes on answering."""
    subjects = Subjects(namespace)
    ours = block_hashes(TOKENS[:B], B)
    async with running_bridge(engine, nats_url, namespace, replay=False):
        await engine.send(map_batch(stored([1], None, TOKENS[:B])))
        assert await tap.events(1) == [BlockStored(ours, None, "device")]
        hint = PinHint("session-1", ours, ttl_s=30.0, host_ttl_s=60.0, prefetch_after_s=0.5)
        with caplog.at_level(logging.DEBUG, logger="kvgate.publisher"):
            await tap.nc.publish(subjects.pin(WORKER), encode(hint))
            # a dump request after the hint: answered once the hint is handled (one subscription)
            reply = await tap.nc.request(subjects.dump(WORKER), encode(StateDumpRequest("test")), timeout=10)
            handled = list(caplog.records)
        assert [b.block_hash for b in decode(reply.data, KvStateDump).blocks] == ours
    # a callback's exception would reach the publisher's NATS error callback (a DEBUG line)
    assert not [r.getMessage() for r in handled if r.name == "kvgate.publisher"]
