"""Tiered KV events from vLLM and SGLang, decoded from their exact wire bytes, translated by the bridge
and applied to the router's `BlockIndex`: each block must end up on the tier its engine holds it on.

The structs below mirror the engines' own definitions (same fields, same order, same msgspec options),
so msgspec produces the bytes those engines publish:

- vLLM, `vllm/distributed/kv_events.py` (main): `EventBatch(omit_defaults)` and events tagged by class
  name (`KVCacheEvent(tag=True, omit_defaults=True)`, a map with a "type" key), `MEDIUM_GPU` "GPU",
  `MEDIUM_CPU` "CPU", `MEDIUM_STORAGE` "STORAGE", and `locality` "LOCAL" / "REMOTE". Its CPU offloading
  connector (`vllm/distributed/kv_transfer/kv_connector/v1/offloading/events.py`) announces a CPU copy
  either self-describing (token ids, parent) or, by default, as a placeholder: the block's hash with
  `token_ids=[]` and `block_size=0`.
- SGLang, `python/sglang/srt/disaggregation/kv_events.py`: `EventBatch(array_like=True)` =
  `[ts, events, attn_dp_rank]`, `KVCacheEvent(array_like=True, tag=True)` without omit_defaults, so a
  store is `["BlockStored", hashes, parent, tokens, block_size, lora_id, medium]`; `StorageMedium` GPU
  "GPU", CPU "CPU_PINNED", DISK "DISK", EXTERNAL "EXTERNAL". HiCache (`mem_cache/hiradix_cache.py`)
  stores a node's host copy with `medium=StorageMedium.CPU` once its write-through lands, removes it
  with the same medium when the host evicts it, and reports device evictions and loads back as GPU.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from engines.bridge import EventTranslator, decode_batch
from router.hashing import block_hashes
from router.index import BlockIndex
from router.protocol import BlockRemoved, BlockStored
from tests.engines.vllm_events import VllmBlockRemoved, VllmBlockStored, VllmEventBatch

B = 16
WORKER = "engine-0"
TOKENS = list(range(2000, 2000 + 4 * B))
OURS = block_hashes(TOKENS, B)


# --- vLLM (main): map events


def vllm_batch(*events: Any) -> bytes:
    return msgspec.msgpack.encode(VllmEventBatch(1.0, list(events), 0))


def vllm_gpu_store(hashes: list[int], parent: int | None, tokens: list[int]) -> VllmBlockStored:
    return VllmBlockStored(hashes, parent, tokens, B, None, "GPU", None, group_idx=0)


def vllm_cpu_placeholder(engine_hash: int) -> VllmBlockStored:
    """The offloading connector's default announcement of a CPU copy (its `_placeholder_stored`)."""
    return VllmBlockStored([engine_hash], None, [], 0, None, "CPU", None, group_idx=0, locality="LOCAL")


# --- SGLang: positional events


class StorageMedium(enum.StrEnum):  # SGLang's (str, enum.Enum): msgspec encodes both as the value
    GPU = "GPU"
    CPU = "CPU_PINNED"
    DISK = "DISK"
    EXTERNAL = "EXTERNAL"


class SglangEvent(msgspec.Struct, array_like=True, gc=False, tag=True):
    pass


class SglangBlockStored(SglangEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None = None


class SglangBlockRemoved(SglangEvent, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None = None


class SglangEventBatch(msgspec.Struct, array_like=True, gc=False):
    ts: float
    events: list[SglangBlockStored | SglangBlockRemoved]
    attn_dp_rank: int | None = None


def sglang_batch(*events: Any) -> bytes:
    return msgspec.msgpack.encode(SglangEventBatch(1.0, list(events), 0))


# --- the bridge's translation into the router's index


class Engine:
    """One engine's events through the bridge's decoder and translator into a `BlockIndex`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.translator = EventTranslator(B)
        self.index = BlockIndex()
        self.index.add_worker(WORKER, 1 << 20)
        self.published: list[Any] = []

    def send(self, payload: bytes) -> list[Any]:
        batch = decode_batch(payload, self.kind)  # type: ignore[arg-type]
        assert batch.skipped == 0
        events = self.translator.translate(batch.events)
        self.index.apply(WORKER, events)
        self.published += events
        return events

    def held(self, tier: str) -> int:
        """Blocks of the prompt's chain this worker holds on `tier`, as a prefix."""
        return self.index.overlap(OURS, tier).get(WORKER, 0)  # type: ignore[arg-type]

    def reach(self) -> int:
        """The prefix it serves from the device and then the host (what its engine onboards)."""
        return self.index.reach(OURS, "host").get(WORKER, 0)


def test_sglang_wire_bytes_are_pinned() -> None:
    # [ts, [["BlockStored", [5], nil, [1, 2], 2, nil, "CPU_PINNED"]], 0]: the mirror encodes as SGLang
    # does (StorageMedium.CPU goes out as its value).
    stored = SglangBlockStored([5], None, [1, 2], 2, None, StorageMedium.CPU)
    payload = msgspec.msgpack.encode(SglangEventBatch(1.5, [stored], 0))
    assert payload == (
        b"\x93\xcb\x3f\xf8\x00\x00\x00\x00\x00\x00\x91\x97\xabBlockStored\x91\x05\xc0\x92\x01\x02\x02\xc0"
        b"\xaaCPU_PINNED\x00"
    )
    event = decode_batch(payload, "sglang").events[0]
    assert (event.block_hashes, event.medium, event.token_ids) == ([5], "CPU_PINNED", [1, 2])


def test_vllm_cpu_offload_puts_blocks_on_host() -> None:
    engine = Engine("vllm")
    e = [(1 << 63) + i for i in range(4)]  # vLLM's hashes: the low 64 bits of a digest, unsigned
    engine.send(vllm_batch(vllm_gpu_store(e, None, TOKENS)))
    assert (engine.held("device"), engine.held("host")) == (4, 0)

    # The connector copies the first three to CPU (placeholders, by hash), then the GPU evicts the tail.
    assert engine.send(vllm_batch(*[vllm_cpu_placeholder(h) for h in e[:3]])) == [
        BlockStored([OURS[0]], None, "host"),
        BlockStored([OURS[1]], OURS[0], "host"),  # each placed under the parent its GPU store named
        BlockStored([OURS[2]], OURS[1], "host"),
    ]
    engine.send(vllm_batch(VllmBlockRemoved(e[1:], "GPU", 0)))
    assert (engine.held("device"), engine.held("host"), engine.reach()) == (1, 3, 3)

    # The host evicts the first copy: the device still holds that block, so the reach is unchanged.
    engine.send(vllm_batch(VllmBlockRemoved([e[0]], "CPU", 0, locality="LOCAL")))
    assert (engine.held("device"), engine.held("host"), engine.reach()) == (1, 0, 3)

    # A self-describing store (token ids, parent) of the fourth block, straight to CPU.
    stored = VllmBlockStored([e[3]], e[2], TOKENS[3 * B :], B, None, "CPU", None, group_idx=0)
    assert engine.send(vllm_batch(stored)) == [BlockStored([OURS[3]], OURS[2], "host")]
    assert engine.reach() == 4


def test_sglang_hicache_write_through_evict_and_load_back() -> None:
    engine = Engine("sglang")
    signed = [-(1 << 62) - i for i in range(4)]  # SGLang sends signed int64 hashes
    node = SglangBlockStored(signed, None, TOKENS, B, None, StorageMedium.GPU)
    engine.send(sglang_batch(node))
    # The write-through to host lands: the same node, stored again with the host medium.
    backup = SglangBlockStored(signed, None, TOKENS, B, None, StorageMedium.CPU)
    assert engine.send(sglang_batch(backup)) == [BlockStored(OURS, None, "host")]
    assert (engine.held("device"), engine.held("host")) == (4, 4)

    # The device evicts the node (HiCache keeps the host copy): a host hit now.
    engine.send(sglang_batch(SglangBlockRemoved(signed, StorageMedium.GPU)))
    assert (engine.held("device"), engine.held("host"), engine.reach()) == (0, 4, 4)

    # Loaded back for a new turn, then the host drops its copy of the last two pages.
    engine.send(sglang_batch(node))
    engine.send(sglang_batch(SglangBlockRemoved(signed[2:], StorageMedium.CPU)))
    assert (engine.held("device"), engine.held("host"), engine.reach()) == (4, 2, 4)
    assert sorted(b.tier for b in engine.translator.cached_blocks()) == ["device"] * 4 + ["host"] * 2


def test_unknown_media_and_remote_blocks_are_left_out() -> None:
    engine = Engine("sglang")
    hashes, tokens = [11, 12], TOKENS[: 2 * B]
    # SGLang's shared pool and a medium no release names: no tier of this worker, nothing published.
    assert engine.send(sglang_batch(SglangBlockStored(hashes, None, tokens, B, None, "EXTERNAL"))) == []
    assert engine.send(sglang_batch(SglangBlockStored(hashes, None, tokens, B, None, "NVME_OF"))) == []
    assert engine.send(sglang_batch(SglangBlockRemoved(hashes, "EXTERNAL"))) == []
    assert engine.translator.unplaced_blocks == 6
    assert len(engine.index) == 0

    vllm = Engine("vllm")
    remote = VllmBlockStored([7], None, TOKENS[:B], B, None, "CPU", None, locality="REMOTE")
    assert vllm.send(vllm_batch(remote)) == []
    assert vllm.translator.unplaced_blocks == 1
    # LMCache's events through vLLM's connector name the host "cpu"; STORAGE is the disk tier.
    lmcache = VllmBlockStored([8], None, TOKENS[:B], B, None, "cpu", None)
    storage = VllmBlockStored([9], 8, TOKENS[B : 2 * B], B, None, "STORAGE", None)
    assert vllm.send(vllm_batch(lmcache, storage)) == [
        BlockStored([OURS[0]], None, "host"),
        BlockStored([OURS[1]], OURS[0], "disk"),
    ]


def test_repeated_announcements_are_counted_until_the_last_removal() -> None:
    # vLLM's offloading connector re-announces a hash shared by two chunks and removes it per chunk.
    engine = Engine("vllm")
    engine.send(vllm_batch(vllm_gpu_store([1, 2], None, TOKENS[: 2 * B])))
    engine.send(vllm_batch(vllm_cpu_placeholder(1), vllm_cpu_placeholder(1), vllm_cpu_placeholder(99)))
    assert engine.translator.skipped_blocks == 1  # a copy of a block never announced
    assert engine.send(vllm_batch(VllmBlockRemoved([1], "CPU"))) == []  # still held by the other chunk
    assert engine.held("host") == 1
    assert engine.send(vllm_batch(VllmBlockRemoved([1], "CPU"))) == [BlockRemoved([OURS[0]], "host")]
    assert (engine.held("device"), engine.held("host")) == (2, 0)


def test_lmcache_chunks_are_split_into_our_blocks() -> None:
    """LMCache's events through vLLM's LMCache connector: one hash per chunk (256 tokens by default,
    64 here), the chunk's tokens, `block_size` its token count, `medium` "cpu"; a prompt's last chunk
    is shorter (lmcache/v1/cache_engine.py builds them)."""
    engine = Engine("vllm")
    tokens = list(range(3000, 3000 + 64 + 40))  # a whole chunk of 4 of our blocks, then 40 tokens
    ours = block_hashes(tokens, B)
    assert len(ours) == 6
    first = VllmBlockStored([501], None, tokens[:64], 64, None, "cpu", None)
    last = VllmBlockStored([502], 501, tokens[64:], 40, None, "cpu", None)
    assert engine.send(vllm_batch(first, last)) == [
        BlockStored(ours[:4], None, "host"),
        BlockStored(ours[4:], ours[3], "host"),  # its 2 whole blocks; the last 8 tokens match nothing
    ]
    assert engine.index.overlap(ours, "host") == {WORKER: 6}
    # a chunk after one that ends mid-block cannot be placed: its tokens start off our grid
    after = VllmBlockStored([503], 502, list(range(64)), 64, None, "cpu", None)
    assert engine.send(vllm_batch(after)) == []
    assert engine.translator.skipped_blocks == 1 and engine.translator.size_mismatches == 0
    assert engine.send(vllm_batch(VllmBlockRemoved([501], "cpu"))) == [BlockRemoved(ours[:4], "host")]
    held = {(b.block_hash, b.parent_hash) for b in engine.translator.cached_blocks()}
    assert held == {(ours[4], ours[3]), (ours[5], ours[4])}
