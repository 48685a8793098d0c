"""vLLM's KV events through a real bridge, ZMQ and nats-server: both layouts, hash encodings, LoRA
seeds, clears, unknown events and a block size that is not the gateway's."""

from __future__ import annotations

import msgspec

from router.hashing import block_hashes, hash_seed
from router.protocol import AllBlocksCleared, BlockRemoved, BlockStored
from tests.engines.bridge.conftest import BusTap, running_bridge
from tests.engines.bridge.engine_wire import (
    TOKENS,
    ArrayRemoved,
    ArrayStored,
    B,
    EnginePublisher,
    array_batch,
    map_batch,
    stored,
)
from tests.engines.vllm_events import VllmAllBlocksCleared, VllmBlockRemoved


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


async def test_block_size_mismatch_is_skipped(
    engine: EnginePublisher, tap: BusTap, nats_url: str, namespace: str
) -> None:
    async with running_bridge(engine, nats_url, namespace, replay=False, block_size=32) as bridge:
        await engine.send(map_batch(stored([1], None, TOKENS[:B])))
        await engine.send(map_batch(VllmAllBlocksCleared()))
        assert await tap.events(1) == [AllBlocksCleared()]
        assert bridge.translator.size_mismatches == 1
