"""Publisher against a real nats-server, in process: batch numbering, replay exactness, the empty
"events still flow" batch, and the gap a dropped backlog leaves."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import nats
import pytest

from engines import publisher as publisher_module
from engines.engine import Engine, EngineConfig, EngineRequest
from engines.mock import MockRunner
from engines.publisher import Publisher
from engines.runner import SamplingParams
from engines.worker import EngineLoop
from router.protocol import BlockStored, KvEventBatch, Subjects, WorkerRegistration, decode
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
    await settle(lambda: batches and batches[-1].seq == publisher.next_seq - 1)
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
