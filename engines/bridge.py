"""Bridge from a vLLM or SGLang engine's ZMQ KV events to the kvgate bus.

vLLM and SGLang publish their KV cache events on a ZMQ PUB socket: 3 frames (topic, 8-byte big-endian
sequence number, msgpack `EventBatch`). Their block hashes cannot be recomputed outside the engine, so
the bridge re-hashes every stored block from its `token_ids` with `router.hashing` (the hash the
gateway computes from prompts) and keeps a map engine hash -> our hash, to translate removals. It
publishes the result as `KvEventBatch` on JetStream, registers the engine as a worker with a heartbeat,
answers state-dump requests from its map, and optionally turns the engine's Prometheus /metrics into
load reports.

A sequence gap is filled from the engine's replay endpoint (DEALER `[b"", start_seq]`, replies until
seq -1) when one is given, else the worker's blocks are cleared; a sequence that goes back means the
engine restarted, which clears them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Iterator
from typing import Any, Literal

import aiohttp
import msgspec
import nats
import zmq
import zmq.asyncio
from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.errors import BadRequestError, BucketNotFoundError, NotFoundError
from prometheus_client.parser import text_string_to_metric_families

from router.hashing import block_hashes, hash_seed
from router.protocol import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    CachedBlock,
    KvEvent,
    KvEventBatch,
    KvStateDump,
    LoadReport,
    ProtocolError,
    StateDumpRequest,
    Subjects,
    Tier,
    WorkerRegistration,
    check_token,
    decode,
    encode,
)

log = logging.getLogger(__name__)

EngineKind = Literal["vllm", "sglang"]
EngineHash = int | bytes

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a batch beyond this is not a KV event batch; ZMQ drops it
MAX_EVENTS_PER_PUBLISH = 4096  # our batches stay well under the NATS max payload
END_OF_REPLAY = -1
_U64 = (1 << 64) - 1


class WireError(ValueError):
    """Bytes from the engine that are not a KV event batch of either known layout."""


# --- the engine's wire format, decoded into one normalised form


class EngineStored(msgspec.Struct, frozen=True):
    block_hashes: list[EngineHash]
    parent: EngineHash | None
    token_ids: list[int]
    block_size: int
    medium: str | None
    lora_name: str | None
    group_idx: int | None


class EngineRemoved(msgspec.Struct, frozen=True):
    block_hashes: list[EngineHash]
    medium: str | None
    group_idx: int | None


class EngineCleared(msgspec.Struct, frozen=True):
    pass


EngineEvent = EngineStored | EngineRemoved | EngineCleared


class EngineBatch(msgspec.Struct, frozen=True):
    ts: float
    events: list[EngineEvent]
    dp_rank: int | None
    skipped: int = 0  # events of an unknown type or malformed, left out


# Field order of the positional (array_like) layout, after the tag, per vLLM's struct definitions.
_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
                  "lora_name", "extra_keys", "group_idx")  # fmt: skip
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")

_raw_decoder = msgspec.msgpack.Decoder()


def normalise_hash(value: Any) -> EngineHash:
    """Engine hashes are ints (unsigned, or signed int64 in older vLLM and SGLang) or raw bytes;
    the same 64 bits must give the same key whichever sign they were sent with."""
    if isinstance(value, bool):
        raise WireError(f"block hash must be an int or bytes, got {value!r}")
    if isinstance(value, int):
        return value & _U64
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise WireError(f"block hash must be an int or bytes, got {type(value).__name__}")


def decode_batch(payload: bytes) -> EngineBatch:
    """One `EventBatch`: a map (`ts`, `events`, `data_parallel_rank`) or an array in that order;
    each event a map with a `type` key or an array whose first item is the type."""
    try:
        raw = _raw_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise WireError(f"not msgpack: {exc}") from exc
    if isinstance(raw, dict):
        ts, events, rank = raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank")
    elif isinstance(raw, list) and len(raw) >= 2:
        ts, events, rank = raw[0], raw[1], raw[2] if len(raw) > 2 else None
    else:
        raise WireError("an event batch must be a map or an array of at least 2 items")
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not isinstance(events, list):
        raise WireError("an event batch needs a numeric ts and a list of events")
    rank = rank if isinstance(rank, int) and not isinstance(rank, bool) else None
    decoded: list[EngineEvent] = []
    for raw_event in events:
        try:
            decoded.append(decode_event(raw_event))
        except WireError as exc:  # one bad or newer event must not cost the rest of the batch
            log.debug("skipping an engine event: %s", exc)
    return EngineBatch(float(ts), decoded, rank, len(events) - len(decoded))


def decode_event(raw: Any) -> EngineEvent:
    if isinstance(raw, dict):
        kind, fields = raw.get("type"), raw
    elif isinstance(raw, list) and raw:
        kind = raw[0]
        names = _STORED_FIELDS if kind == "BlockStored" else _REMOVED_FIELDS
        fields = dict(zip(names, raw[1:], strict=False))  # trailing fields of newer versions: ignored
    else:
        raise WireError("an event must be a map with a 'type' key or a non-empty array")
    if kind == "BlockStored":
        hashes, tokens = _hashes(fields.get("block_hashes")), _ints(fields.get("token_ids"), "token_ids")
        size = _int(fields.get("block_size"), "block_size")
        if len(tokens) != len(hashes) * size:
            raise WireError(f"{len(hashes)} blocks of {size} tokens, but {len(tokens)} token ids")
        return EngineStored(
            block_hashes=hashes,
            parent=None
            if fields.get("parent_block_hash") is None
            else normalise_hash(fields["parent_block_hash"]),
            token_ids=tokens,
            block_size=size,
            medium=_opt_str(fields.get("medium")),
            lora_name=_opt_str(fields.get("lora_name")),
            group_idx=_opt_int(fields.get("group_idx")),
        )
    if kind == "BlockRemoved":
        return EngineRemoved(
            block_hashes=_hashes(fields.get("block_hashes")),
            medium=_opt_str(fields.get("medium")),
            group_idx=_opt_int(fields.get("group_idx")),
        )
    if kind == "AllBlocksCleared":
        return EngineCleared()
    raise WireError(f"unknown event type {kind!r}")


def _hashes(value: Any) -> list[EngineHash]:
    if not isinstance(value, list):
        raise WireError("block_hashes must be a list")
    return [normalise_hash(v) for v in value]


def _ints(value: Any, what: str) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(v, int) and 0 <= v < 1 << 32 for v in value):
        raise WireError(f"{what} must be a list of uint32")
    return value


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise WireError(f"{what} must be a positive int")
    return value


def _opt_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def medium_tier(medium: str | None) -> Tier:
    """vLLM's `medium`: GPU (or unset) is our device tier, CPU offload is host, anything else disk."""
    if medium is None or medium.upper() == "GPU":
        return "device"
    if medium.upper() == "CPU":
        return "host"
    return "disk"


# --- translation to our hashes


class _Block:
    __slots__ = ("our_hash", "parent", "seed", "tiers")

    def __init__(self, our_hash: int, parent: int | None, seed: int) -> None:
        self.our_hash = our_hash
        self.parent = parent
        self.seed = seed
        self.tiers: set[Tier] = set()


class EventTranslator:
    """Engine events -> our events, keeping engine hash -> our hash for every block the engine holds.

    Only KV cache group 0 is followed (a hybrid model's other groups describe the same tokens).
    A stored block whose parent the bridge never saw cannot be re-hashed (its prefix is unknown) and
    is skipped; so are blocks of a different size than ours, which would never match a prompt.
    """

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._blocks: dict[EngineHash, _Block] = {}
        self.skipped_blocks = 0
        self.size_mismatches = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def our_hash(self, engine_hash: EngineHash) -> int | None:
        block = self._blocks.get(normalise_hash(engine_hash))
        return None if block is None else block.our_hash

    def translate(self, events: Iterable[EngineEvent]) -> list[KvEvent]:
        out: list[KvEvent] = []
        for event in events:
            if isinstance(event, EngineCleared):
                out.extend(self.clear())
            elif event.group_idx not in (None, 0):
                continue
            elif isinstance(event, EngineStored):
                out.extend(self._stored(event))
            else:
                out.extend(self._removed(event))
        return out

    def clear(self) -> list[KvEvent]:
        self._blocks.clear()
        return [AllBlocksCleared()]

    def cached_blocks(self) -> list[CachedBlock]:
        return [
            CachedBlock(b.our_hash, b.parent, tier) for b in self._blocks.values() for tier in sorted(b.tiers)
        ]

    def _stored(self, event: EngineStored) -> Iterator[KvEvent]:
        if event.block_size != self.block_size:
            self.size_mismatches += 1
            self.skipped_blocks += len(event.block_hashes)
            if self.size_mismatches == 1:
                log.error(
                    "engine block size %d != bridge block size %d: its blocks cannot match any prompt;"
                    " start the bridge with --block-size %d",
                    event.block_size, self.block_size, event.block_size,
                )  # fmt: skip
            return
        count = len(event.block_hashes)
        parent: int | None = None
        seed = hash_seed(event.lora_name)
        if event.parent is not None:
            known = self._blocks.get(event.parent)
            if known is None:
                self.skipped_blocks += count
                return
            parent, seed = known.our_hash, known.seed
        tier = medium_tier(event.medium)
        ours = block_hashes(event.token_ids, self.block_size, seed, parent)
        first_parent = parent
        for engine_hash, our in zip(event.block_hashes, ours, strict=True):
            block = self._blocks.get(engine_hash)
            if block is None:
                block = self._blocks[engine_hash] = _Block(our, parent, seed)
            block.tiers.add(tier)
            parent = our
        yield BlockStored(ours, first_parent, tier)

    def _removed(self, event: EngineRemoved) -> Iterator[KvEvent]:
        tier = medium_tier(event.medium)
        gone: list[int] = []
        for engine_hash in event.block_hashes:
            block = self._blocks.get(engine_hash)
            if block is None or tier not in block.tiers:
                continue  # a block we skipped, or a duplicate removal
            block.tiers.discard(tier)
            if not block.tiers:
                del self._blocks[engine_hash]
            gone.append(block.our_hash)
        if gone:
            yield BlockRemoved(gone, tier)


# --- engine load from its Prometheus metrics

# Gauges, vLLM names first, then SGLang's.
_RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
_WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")
_PROMPT_TOKENS = ("vllm:prompt_tokens", "sglang:prompt_tokens")
_GENERATION_TOKENS = ("vllm:generation_tokens", "sglang:generation_tokens")
_CACHE_INFO = "vllm:cache_config_info"
USAGE_SCALE = 10_000  # used/total blocks when the engine does not tell its block count


class EngineMetrics(msgspec.Struct, frozen=True):
    running: int
    waiting: int
    kv_usage: float  # 0..1
    prompt_tokens: float  # counters, for rates between two scrapes
    generation_tokens: float
    num_blocks: int  # 0 when unknown


def parse_metrics(text: str) -> EngineMetrics:
    """The load gauges of a vLLM or SGLang /metrics page (summed over engines and models)."""
    sums: dict[str, float] = {}
    num_blocks = 0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == _CACHE_INFO:
                with contextlib.suppress(KeyError, ValueError):
                    num_blocks = max(num_blocks, int(sample.labels["num_gpu_blocks"]))
                continue
            name = sample.name.removesuffix("_total")
            if family.type == "counter" and sample.name.endswith("_created"):
                continue
            sums[name] = sums.get(name, 0.0) + sample.value

    def first(names: tuple[str, ...]) -> float:
        return next((sums[n] for n in names if n in sums), 0.0)

    return EngineMetrics(
        running=int(first(_RUNNING)),
        waiting=int(first(_WAITING)),
        kv_usage=min(1.0, max(0.0, first(_KV_USAGE))),
        prompt_tokens=first(_PROMPT_TOKENS),
        generation_tokens=first(_GENERATION_TOKENS),
        num_blocks=num_blocks,
    )


# --- the bus side


class BusPublisher:
    """A worker's presence on the bus: registration with heartbeat, KV batches on JetStream,
    load reports, and state dumps on request.

    `dump` is called for each `StateDumpRequest`. The stream and bucket are created when missing;
    when a worker created them first, their configuration is kept.
    """

    STREAM_MAX_AGE_S = 3600.0
    STREAM_MAX_BYTES = 1 << 30

    def __init__(self, nc: NATS, subjects: Subjects, registration: WorkerRegistration) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.subjects = subjects
        self.registration = registration
        self.seq = -1
        self._kv: Any = None
        self._sub: Any = None

    @property
    def worker_id(self) -> str:
        return self.registration.worker_id

    async def start(self, dump: Any) -> None:
        await self._ensure_stream()
        self._kv = await self._ensure_bucket()

        async def on_dump(msg: Any) -> None:
            try:
                decode(msg.data, StateDumpRequest)
            except ProtocolError as exc:
                log.warning("ignoring a malformed dump request: %s", exc)
                return
            await msg.respond(encode(dump()))

        self._sub = await self.nc.subscribe(self.subjects.dump(self.worker_id), cb=on_dump)
        await self.heartbeat()

    async def _ensure_stream(self) -> None:
        try:
            await self.js.stream_info(self.subjects.kv_stream)
        except NotFoundError:
            config = api.StreamConfig(
                name=self.subjects.kv_stream,
                subjects=[self.subjects.kv_all],
                max_age=self.STREAM_MAX_AGE_S,
                max_bytes=self.STREAM_MAX_BYTES,
                discard=api.DiscardPolicy.OLD,
            )
            with contextlib.suppress(BadRequestError):  # created meanwhile by a worker
                await self.js.add_stream(config)

    async def _ensure_bucket(self) -> Any:
        try:
            return await self.js.key_value(self.subjects.registry_bucket)
        except (BucketNotFoundError, NotFoundError):
            return await self.js.create_key_value(bucket=self.subjects.registry_bucket, history=1)

    async def heartbeat(self) -> None:
        self.registration = msgspec.structs.replace(self.registration, heartbeat_ts=time.time())
        await self._kv.put(self.worker_id, encode(self.registration))

    async def publish_events(self, events: list[KvEvent]) -> None:
        for start in range(0, len(events), MAX_EVENTS_PER_PUBLISH):
            self.seq += 1
            batch = KvEventBatch(
                worker_id=self.worker_id,
                epoch=self.registration.epoch,
                seq=self.seq,
                ts=time.time(),
                events=events[start : start + MAX_EVENTS_PER_PUBLISH],
            )
            await self.js.publish(self.subjects.kv(self.worker_id), encode(batch))

    async def publish_load(self, report: LoadReport) -> None:
        await self.nc.publish(self.subjects.load(self.worker_id), encode(report))

    async def stop(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        if self._kv is not None:
            with contextlib.suppress(Exception):  # the bus may already be gone; the TTL covers it
                await self._kv.delete(self.worker_id)


# --- the bridge


class BridgeConfig(msgspec.Struct, frozen=True):
    zmq_endpoint: str
    url: str
    model: str
    nats_url: str
    worker_id: str
    block_size: int = 16
    replay_endpoint: str | None = None
    namespace: str = "kvgate"
    engine: EngineKind = "vllm"
    tokenizer: str = "byte"
    num_blocks: int = 0
    topic: str = ""
    heartbeat_s: float = 1.0
    metrics_interval_s: float = 0.5  # 0: no load reports
    replay_timeout_s: float = 2.0


class Bridge:
    """Follows one engine's ZMQ events and keeps its worker entry on the bus up to date."""

    def __init__(self, config: BridgeConfig) -> None:
        check_token(config.worker_id, "worker id")
        if config.block_size < 1:
            raise ValueError("block size must be positive")
        self.config = config
        self.translator = EventTranslator(config.block_size)
        self.last_seq: int | None = None  # the engine's last sequence number applied
        self._dedupe_until = -1  # after a replay, live messages up to here were already applied
        self.malformed = 0
        self.gaps = 0
        self.restarts = 0
        self._ctx = zmq.asyncio.Context()
        self._nc: NATS | None = None
        self.bus: BusPublisher | None = None
        self._num_blocks = config.num_blocks
        self._last_scrape: tuple[float, EngineMetrics] | None = None
        self.ready = asyncio.Event()

    def registration(self) -> WorkerRegistration:
        c = self.config
        return WorkerRegistration(
            worker_id=c.worker_id,
            url=c.url,
            model=c.model,
            block_size=c.block_size,
            num_blocks=self._num_blocks,
            engine=c.engine,
            epoch=time.time_ns(),
            heartbeat_ts=time.time(),
            tokenizer=c.tokenizer,
        )

    def dump(self) -> KvStateDump:
        assert self.bus is not None
        return KvStateDump(
            self.config.worker_id, self.bus.registration.epoch, self.bus.seq, self.translator.cached_blocks()
        )

    async def run(self) -> None:
        self._nc = await nats.connect(self.config.nats_url, max_reconnect_attempts=-1)
        self.bus = BusPublisher(self._nc, Subjects(self.config.namespace), self.registration())
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, self.config.topic.encode())
        sub.connect(self.config.zmq_endpoint)
        tasks: list[asyncio.Task[None]] = []
        try:
            await self.bus.start(self.dump)
            tasks.append(asyncio.create_task(self._heartbeats()))
            if self.config.metrics_interval_s > 0:
                tasks.append(asyncio.create_task(self._scrape_metrics()))
            self.ready.set()
            log.info(
                "bridge %s: %s -> %s", self.config.worker_id, self.config.zmq_endpoint, self.config.nats_url
            )
            await self._follow(sub)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            sub.close(linger=0)
            await self.bus.stop()
            await self._nc.drain()
            self._ctx.term()

    async def _follow(self, sub: zmq.asyncio.Socket) -> None:
        while True:
            frames = await sub.recv_multipart()
            if len(frames) != 3 or len(frames[1]) != 8:
                self.malformed += 1
                log.warning("dropping a ZMQ message of %d frames (expected topic, seq, payload)", len(frames))
                continue
            await self.on_message(int.from_bytes(frames[1], "big", signed=True), frames[2])

    async def on_message(self, seq: int, payload: bytes) -> None:
        """One live message from the PUB socket: check its sequence number, then apply it."""
        last = self.last_seq
        if last is not None and 0 < seq <= self._dedupe_until:
            return  # already applied from a replay
        self._dedupe_until = -1
        if last is not None and seq <= last:
            self.restarts += 1
            log.warning("engine sequence went back from %d to %d: engine restarted, clearing", last, seq)
            await self._publish(self.translator.clear())
            last = self.last_seq = None
        expected = 0 if last is None else last + 1
        if seq > expected and (last is not None or self.config.replay_endpoint is not None):
            # A gap, or a bridge that joined after the engine had started: what came before is missing.
            self.gaps += 1
            if await self._replay(expected, seq):
                return
            if last is not None:
                log.warning("missed engine batches %d..%d and could not replay: clearing", expected, seq - 1)
                await self._publish(self.translator.clear())
        await self._apply(seq, payload)

    async def _apply(self, seq: int, payload: bytes) -> None:
        self.last_seq = seq
        try:
            batch = decode_batch(payload)
        except WireError as exc:
            self.malformed += 1
            log.warning("dropping malformed engine batch %d: %s", seq, exc)
            return
        self.malformed += batch.skipped
        await self._publish(self.translator.translate(batch.events))

    async def _publish(self, events: list[KvEvent]) -> None:
        if events and self.bus is not None:
            await self.bus.publish_events(events)

    async def _replay(self, start: int, needed: int) -> bool:
        """Apply the engine's buffered batches from `start`; True when they reach `needed`."""
        endpoint = self.config.replay_endpoint
        if endpoint is None:
            return False
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(endpoint)
        reached = False
        try:
            await dealer.send_multipart([b"", start.to_bytes(8, "big")])
            while True:
                if not await dealer.poll(self.config.replay_timeout_s * 1000):
                    log.warning("replay from %s timed out", endpoint)
                    return reached
                frames = await dealer.recv_multipart()
                if frames and frames[0] == b"":
                    frames = frames[1:]  # the ROUTER's envelope delimiter
                if len(frames) == 3:
                    frames = frames[1:]  # [topic, seq, payload]
                if len(frames) != 2 or len(frames[0]) != 8:
                    self.malformed += 1
                    return reached
                seq = int.from_bytes(frames[0], "big", signed=True)
                if seq == END_OF_REPLAY:
                    return reached
                expected = 0 if self.last_seq is None else self.last_seq + 1
                if seq < expected:
                    continue
                if seq > expected and self.last_seq is not None:
                    log.warning("replay starts at %d, after %d: clearing", seq, expected)
                    await self._publish(self.translator.clear())
                await self._apply(seq, frames[1])
                self._dedupe_until = seq
                reached = reached or seq >= needed
        finally:
            dealer.close(linger=0)

    async def _heartbeats(self) -> None:
        assert self.bus is not None
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            try:
                if self._num_blocks != self.bus.registration.num_blocks:
                    self.bus.registration = msgspec.structs.replace(
                        self.bus.registration, num_blocks=self._num_blocks
                    )
                await self.bus.heartbeat()
            except Exception as exc:  # NATS down: keep trying; the client reconnects
                log.warning("heartbeat failed: %s", exc)

    async def _scrape_metrics(self) -> None:
        url = self.config.url.rstrip("/") + "/metrics"
        timeout = aiohttp.ClientTimeout(total=max(1.0, 4 * self.config.metrics_interval_s))
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                try:
                    async with session.get(url) as resp:
                        resp.raise_for_status()
                        text = await resp.content.read(8 * 1024 * 1024)
                    await self._report(parse_metrics(text.decode(errors="replace")))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # engine restarting, or a page we cannot parse
                    log.debug("metrics scrape of %s failed: %s", url, exc)
                await asyncio.sleep(self.config.metrics_interval_s)

    async def _report(self, metrics: EngineMetrics) -> None:
        assert self.bus is not None
        now = time.monotonic()
        if metrics.num_blocks:
            self._num_blocks = metrics.num_blocks
        prefill_rate = decode_rate = 0.0
        if self._last_scrape is not None:
            then, prev = self._last_scrape
            dt = max(now - then, 1e-3)
            prefill_rate = max(0.0, metrics.prompt_tokens - prev.prompt_tokens) / dt
            decode_rate = max(0.0, metrics.generation_tokens - prev.generation_tokens) / dt
        self._last_scrape = (now, metrics)
        total = self._num_blocks or USAGE_SCALE
        await self.bus.publish_load(
            LoadReport(
                worker_id=self.config.worker_id,
                ts=time.time(),
                running=metrics.running,
                waiting=metrics.waiting,
                active_prefill_tokens=0,
                used_blocks=round(metrics.kv_usage * total),
                total_blocks=total,
                prefill_tok_s=prefill_rate,
                decode_tok_s=decode_rate,
            )
        )
