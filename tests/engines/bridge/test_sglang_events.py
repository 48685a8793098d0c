"""SGLang's positional KV events through a real bridge, ZMQ and nats-server into the router's index."""

from __future__ import annotations

import time
from typing import Any

import msgspec

from router.hashing import block_hashes
from router.index import BlockIndex
from tests.engines.bridge.conftest import BusTap, running_bridge
from tests.engines.bridge.engine_wire import TOKENS, WORKER, B, EnginePublisher


async def test_sglang_hicache_tiers_reach_the_index_and_bad_bytes_are_dropped(
    engine: EnginePublisher, tap: BusTap, nats_url: str, namespace: str
) -> None:
    """SGLang's positional events (`[ts, events, attn_dp_rank]`, stores ending at `medium`, see
    tests/engines/bridge/test_tiers.py) through the bridge process's loop and the bus into a BlockIndex:
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
