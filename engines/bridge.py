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
from array import array
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, TypeVar

import aiohttp
import msgspec
import zmq
import zmq.asyncio
from prometheus_client.parser import text_string_to_metric_families

from engines.engine import EngineLoad
from engines.publisher import Publisher
from kvutil.bus_auth import BusAuth, redact_url
from kvutil.tasks import cancel_and_wait
from router.hashing import block_hashes, hash_seed
from router.protocol import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    CachedBlock,
    KvEvent,
    Subjects,
    Tier,
    WorkerRegistration,
    check_token,
)
from router.tokenizer_files import digest, read_folder

log = logging.getLogger(__name__)

T = TypeVar("T")

EngineKind = Literal["vllm", "sglang"]
EngineHash = int | bytes

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a batch beyond this is not a KV event batch; ZMQ drops it
END_OF_REPLAY = -1
# Far above any engine's block count: reaching it means removals went missing, so start over.
MAX_TRACKED_BLOCKS = 8_000_000
LOAD_REPORTS_OFF_S = 3600.0  # without /metrics, one zero report at start and hourly after
SCRAPER_STOP_S = 2.0  # for the /metrics scraper's task at stop
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
    try:
        if isinstance(value, list):
            array("I", value)  # checks every item is a uint32, at C speed
            return value
    except (TypeError, OverflowError):
        pass
    raise WireError(f"{what} must be a list of uint32")


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

    def __init__(self, block_size: int, max_blocks: int = MAX_TRACKED_BLOCKS) -> None:
        self.block_size = block_size
        self.max_blocks = max_blocks
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
                if len(self._blocks) >= self.max_blocks:
                    log.error("tracking %d blocks: removals must have been lost; clearing", len(self._blocks))
                    yield from self.clear()
                    return
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


# --- what the worker publisher reads from an engine


class RemoteEngine:
    """The engine as `engines.publisher.Publisher` sees it (its `loop` and `loop.engine`), for an
    engine in another process: the blocks the bridge translated, and the load scraped from /metrics.

    vLLM and SGLang take no pin hints, so pins are acknowledged and ignored.
    """

    def __init__(self, translator: EventTranslator) -> None:
        self.translator = translator
        self.latest = EngineLoad(0, 0, 0, 0, 0, 0.0, 0.0)
        self.on_events: Callable[[list[KvEvent]], None] | None = None  # set by the Publisher
        self.on_finished: Callable[[], None] | None = None

    @property
    def engine(self) -> RemoteEngine:
        return self

    async def call(self, fn: Callable[[], T]) -> T:
        return fn()

    def load(self) -> EngineLoad:
        return self.latest

    def cached_blocks(self) -> list[CachedBlock]:
        return self.translator.cached_blocks()

    def pin(self, session_id: str, block_hashes: list[int], ttl_s: float) -> int:
        return 0


# --- the bridge


def tokenizer_bundle(spec: str) -> tuple[str, bytes | None]:
    """The name to register and the files to store for `--tokenizer`: a checkpoint folder or its
    tokenizer.json this bridge can read goes on the bus by content hash (with the chat template and
    special tokens beside it); `byte`, or a path only the gateway can read, is registered as given."""
    if spec == "byte":
        return spec, None
    try:
        files = read_folder(spec)
    except OSError:
        files = None
    if files is None:
        log.warning("tokenizer %s is not readable here: registered by path, for the gateway to read", spec)
        return spec, None
    data = files.encode()
    return digest(data), data


class BridgeConfig(msgspec.Struct, frozen=True):
    zmq_endpoint: str
    url: str
    model: str
    nats_url: str
    worker_id: str
    bus_auth: BusAuth = msgspec.field(default_factory=BusAuth)
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
        self.remote = RemoteEngine(self.translator)
        self._num_blocks = config.num_blocks
        self._epoch = time.time_ns()
        self.tokenizer, bundle = tokenizer_bundle(config.tokenizer)
        self.publisher = Publisher(
            config.nats_url,
            Subjects(config.namespace),
            self.remote,  # type: ignore[arg-type]  # the loop interface the Publisher drives
            self.registration,
            auth=config.bus_auth,
            load_interval_s=config.metrics_interval_s or LOAD_REPORTS_OFF_S,
            heartbeat_interval_s=config.heartbeat_s,
            tokenizer_bundle=bundle,
        )
        self._last_scrape: tuple[float, EngineMetrics] | None = None
        self._stopping = asyncio.Event()

    def registration(self) -> WorkerRegistration:
        c = self.config
        return WorkerRegistration(
            worker_id=c.worker_id,
            url=c.url,
            model=c.model,
            block_size=c.block_size,
            num_blocks=self._num_blocks,
            engine=c.engine,
            epoch=self._epoch,
            heartbeat_ts=time.time(),
            tokenizer=self.tokenizer,
        )

    async def run(self) -> None:
        """Publish until `stop()`; the engine's events are followed (and queued) while NATS connects."""
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, self.config.topic.encode())
        sub.connect(self.config.zmq_endpoint)
        scraper: asyncio.Task[None] | None = None
        try:
            await self.publisher.start()
            if self.config.metrics_interval_s > 0:
                scraper = asyncio.create_task(self._scrape_metrics())
            c = self.config
            log.info("bridge %s: %s -> %s", c.worker_id, c.zmq_endpoint, redact_url(c.nats_url))
            await self._follow(sub)
        finally:
            if scraper is not None:
                await cancel_and_wait([scraper], SCRAPER_STOP_S)
            sub.close(linger=0)
            await self.publisher.stop()
            self._ctx.term()

    @property
    def ready(self) -> asyncio.Event:
        """Set once the bridge is on the bus (connected, stream and bucket in place)."""
        return self.publisher.ready

    def stop(self) -> None:
        """Finish the message in hand, deregister and return from `run`."""
        self._stopping.set()

    async def _follow(self, sub: zmq.asyncio.Socket) -> None:
        # Stopping is a flag rather than a task cancel: a cancel that races a reply inside pyzmq or
        # nats-py (asyncio.wait_for on 3.11) can be lost, and a bridge must always stop.
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while True:
                receiving = asyncio.ensure_future(sub.recv_multipart())
                await asyncio.wait((receiving, stopping), return_when=asyncio.FIRST_COMPLETED)
                if not receiving.done():
                    receiving.cancel()
                    return
                await self._on_frames(receiving.result())
        finally:
            stopping.cancel()

    async def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self.malformed += 1
            log.warning("dropping a ZMQ message of %d frames (expected topic, seq, payload)", len(frames))
            return
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
            self._publish(self.translator.clear())
            last = self.last_seq = None
        expected = 0 if last is None else last + 1
        if seq > expected and (last is not None or self.config.replay_endpoint is not None):
            # A gap, or a bridge that joined after the engine had started: what came before is missing.
            self.gaps += 1
            if await self._replay(expected, seq):
                return
            if last is not None:
                log.warning("missed engine batches %d..%d and could not replay: clearing", expected, seq - 1)
                self._publish(self.translator.clear())
        self._apply(seq, payload)

    def _apply(self, seq: int, payload: bytes) -> None:
        self.last_seq = seq
        try:
            batch = decode_batch(payload)
        except WireError as exc:
            self.malformed += 1
            log.warning("dropping malformed engine batch %d: %s", seq, exc)
            return
        self.malformed += batch.skipped
        self._publish(self.translator.translate(batch.events))

    def _publish(self, events: list[KvEvent]) -> None:
        if events:
            self.publisher.add_events(events)

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
                    self._publish(self.translator.clear())
                self._apply(seq, frames[1])
                self._dedupe_until = seq
                reached = reached or seq >= needed
        finally:
            dealer.close(linger=0)

    async def _scrape_metrics(self) -> None:
        url = self.config.url.rstrip("/") + "/metrics"
        timeout = aiohttp.ClientTimeout(total=max(1.0, 4 * self.config.metrics_interval_s))
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                try:
                    async with session.get(url) as resp:
                        resp.raise_for_status()
                        text = await resp.content.read(8 * 1024 * 1024)
                    self._observe(parse_metrics(text.decode(errors="replace")))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # engine restarting, or a page we cannot parse
                    log.debug("metrics scrape of %s failed: %s", url, exc)
                await asyncio.sleep(self.config.metrics_interval_s)

    def _observe(self, metrics: EngineMetrics) -> None:
        """The load the Publisher reports next (its reports follow the scrape interval)."""
        now = time.monotonic()
        if metrics.num_blocks:
            self._num_blocks = metrics.num_blocks
        prefill_rate = decode_rate = 0.0
        if self._last_scrape is not None:
            then, prev = self._last_scrape
            dt = max(now - then, 1e-3)
            prefill_rate = max(0.0, metrics.prompt_tokens - prev.prompt_tokens) / dt
            decode_rate = max(0.0, metrics.generation_tokens - prev.generation_tokens) / dt
            served = metrics.generation_tokens > prev.generation_tokens
            if served and self.last_seq is not None and self.remote.on_finished is not None:
                # Requests ran and the event stream is known to work: the Publisher's next heartbeat
                # sends an empty batch if they cached nothing new, so the gateway does not take the
                # silence for lost events (and fall back to approximate routing).
                self.remote.on_finished()
        self._last_scrape = (now, metrics)
        total = self._num_blocks or USAGE_SCALE
        self.remote.latest = EngineLoad(
            running=metrics.running,
            waiting=metrics.waiting,
            active_prefill_tokens=0,  # not exposed by either engine
            used_blocks=round(metrics.kv_usage * total),
            total_blocks=total,
            prefill_tok_s=prefill_rate,
            decode_tok_s=decode_rate,
        )
