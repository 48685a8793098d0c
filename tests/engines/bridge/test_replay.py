"""Sequence gaps, late starts and engine restarts: filled from the engine's replay endpoint when it has
one, else the worker's blocks are cleared."""

from __future__ import annotations

from router.hashing import block_hashes
from router.protocol import AllBlocksCleared, BlockRemoved, BlockStored
from tests.engines.bridge.conftest import BusTap, running_bridge
from tests.engines.bridge.engine_wire import TOKENS, B, EnginePublisher, map_batch, stored
from tests.engines.vllm_events import VllmBlockRemoved


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
