"""An engine's side of the bridge's ZMQ link in tests: vLLM's `ZmqEventPublisher` wire-for-wire, and
event batches in vLLM's layouts.

The publisher sends the exact frames vLLM's `ZmqEventPublisher` sends (topic, 8-byte big-endian seq,
msgpack EventBatch), with the events encoded by msgspec tagged structs as vLLM defines them: the newer
map layout (`{"type": "BlockStored", ...}`) and the older positional one (`["BlockStored", hashes,
...]`, also SGLang's), and answers replay requests on a ROUTER socket the way vLLM does. It binds an
XPUB socket (a PUB that also reports subscriptions) only so a test can wait until the bridge has
subscribed instead of losing its first messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from tests.engines.vllm_events import VllmBlockStored, VllmEventBatch

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
