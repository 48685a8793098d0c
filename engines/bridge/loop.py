"""The bridge itself: follows one engine's ZMQ events (replaying gaps), publishes them and the engine's
registration and load on the bus, and watches the engine's health.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
import msgspec
import zmq
import zmq.asyncio

from engines.bridge.engine_metrics import USAGE_SCALE, EngineMetrics, parse_metrics
from engines.bridge.remote import RemoteEngine
from engines.bridge.translate import EventTranslator
from engines.bridge.wire import EngineKind, WireError, decode_batch
from engines.engine import EngineLoad
from engines.publisher import Publisher
from kvutil.bus_auth import BusAuth, redact_url
from kvutil.tasks import cancel_and_wait
from router.protocol import (
    KvEvent,
    Subjects,
    WorkerRegistration,
    check_token,
)
from router.tokenizer_files import digest, read_folder

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a batch beyond this is not a KV event batch; ZMQ drops it
END_OF_REPLAY = -1
LOAD_REPORTS_OFF_S = 3600.0  # without /metrics, one zero report at start and hourly after
SCRAPER_STOP_S = 2.0  # for the /metrics scraper's task at stop


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
    health_interval_s: float = 1.0  # GET <url>/health this often; 0: no health checks
    health_failures: int = 3  # failed checks in a row that take the engine off the bus


class Bridge:
    """Follows one engine's ZMQ events and keeps its worker entry on the bus up to date."""

    def __init__(self, config: BridgeConfig) -> None:
        check_token(config.worker_id, "worker id")
        if config.block_size < 1:
            raise ValueError("block size must be positive")
        self.config = config
        self._logged_url = redact_url(config.url)  # an engine URL may carry credentials: never logged
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
            self.remote,
            self.registration,
            auth=config.bus_auth,
            load_interval_s=config.metrics_interval_s or LOAD_REPORTS_OFF_S,
            heartbeat_interval_s=config.heartbeat_s,
            tokenizer_bundle=bundle,
        )
        self._last_scrape: tuple[float, EngineMetrics] | None = None
        self._stopping = asyncio.Event()
        self.engine_down = False  # failed its health checks: deregistered until it answers again

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
        watchers: list[asyncio.Task[None]] = []
        try:
            await self.publisher.start()
            if self.config.metrics_interval_s > 0:
                watchers.append(asyncio.create_task(self._scrape_metrics()))
            if self.config.health_interval_s > 0:
                watchers.append(asyncio.create_task(self._watch_health()))
            c = self.config
            log.info("bridge %s: %s -> %s", c.worker_id, c.zmq_endpoint, redact_url(c.nats_url))
            if c.replay_endpoint is not None:  # what the engine cached before this bridge started
                await self._replay(0, 0)
            await self._follow(sub)
        finally:
            await cancel_and_wait(watchers, SCRAPER_STOP_S)
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
            batch = decode_batch(payload, self.config.engine)
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
                    log.debug("metrics scrape of %s failed: %s", self._logged_url, redact_url(str(exc)))
                await asyncio.sleep(self.config.metrics_interval_s)

    async def _watch_health(self) -> None:
        """`health_failures` failed checks in a row take the engine off the bus (deregistered, its blocks
        cleared); the first answer after that puts it back, with no blocks until it stores new ones."""
        url = self.config.url.rstrip("/") + "/health"
        failures = 0
        timeout = aiohttp.ClientTimeout(total=max(0.5, self.config.health_interval_s))
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                try:
                    async with session.get(url) as resp:
                        healthy = resp.status == 200
                except asyncio.CancelledError:
                    raise
                except Exception:  # refused, reset, timed out: the engine is not answering
                    healthy = False
                failures = 0 if healthy else failures + 1
                if healthy and self.engine_down:
                    self._engine_back()
                elif failures == self.config.health_failures and not self.engine_down:
                    await self._engine_lost(failures)
                await asyncio.sleep(self.config.health_interval_s)

    async def _engine_lost(self, failures: int) -> None:
        url = self._logged_url
        log.warning("engine %s failed %d health checks: off the bus until it answers", url, failures)
        self.engine_down = True
        self.publisher.paused = True
        self._publish(self.translator.clear())
        await self.publisher.deregister()

    def _engine_back(self) -> None:
        log.info("engine %s answers again: registering it (its cache starts empty)", self._logged_url)
        self.engine_down = False
        self.last_seq = None  # a restarted engine numbers its batches from 0 again
        self._publish(self.translator.clear())
        self.publisher.paused = False

    def _restarted(self, metrics: EngineMetrics) -> bool:
        """The engine's process start time moved: it restarted, and its cache is empty."""
        if self._last_scrape is None or not metrics.started_at:
            return False
        before = self._last_scrape[1].started_at
        return bool(before) and metrics.started_at != before

    def _observe(self, metrics: EngineMetrics) -> None:
        """The load the Publisher reports next (its reports follow the scrape interval)."""
        if self._restarted(metrics):
            self.restarts += 1
            log.warning("engine %s restarted (its metrics say): clearing its blocks", self._logged_url)
            self._publish(self.translator.clear())
            self.last_seq = None
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
