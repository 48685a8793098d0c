"""A worker's side of the NATS bus.

- KV events: batches with a per-process sequence number and epoch, through JetStream (the stream is
  created if missing, with bounded retention). Events that pile up while a publish is in flight go
  out together as the next batch. A batch that cannot be published is dropped; its sequence number
  is not reused, so subscribers see the gap and ask for a state dump.
- load reports on plain NATS at 10 Hz; registration in the JetStream KV bucket, rewritten every
  second as the heartbeat and deleted on a clean shutdown.
- state dumps on request (`dump.<worker>`), pin hints applied from `pin.<worker>`.

NATS may come and go: the HTTP side never waits on it, and everything resumes on reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.js.errors import BucketNotFoundError, NotFoundError

from engines.published_loop import PublishedLoop
from kvutil.bus_auth import BusAuth, redact_url
from kvutil.kv_stream import kv_stream_config
from kvutil.nats_errors import log_nats_error
from kvutil.tasks import cancel_and_wait, wait_for_bounded
from router.protocol import (
    KvEvent,
    KvEventBatch,
    KvStateDump,
    PinHint,
    ProtocolError,
    StateDumpRequest,
    Subjects,
    WorkerRegistration,
    decode,
    encode,
)
from router.tokenizer_files import HASH_PREFIX, digest

log = logging.getLogger("kvgate.publisher")

REGISTRY_TTL_S = 60.0  # a crashed worker's entry disappears even if nobody deletes it
MAX_PENDING_EVENTS = 100_000  # beyond this (NATS away for long) events are dropped: a gap
# hashes listed by the pending prefetches together (~40 MB): pin hints come from the bus, one per
# session, each up to a message's size; past this the oldest pending prefetches are dropped
MAX_PREFETCH_HASHES = 1 << 20
# and their sessions (each id up to MAX_SESSION_ID_CHARS): a flood of one-block hints stays ~64 MiB
MAX_PREFETCH_SESSIONS = 1 << 16
STOP_TIMEOUT_S = 5.0  # stop() in all: tasks 40 %, final flush and deregistration 35 %, close 25 %


class Publisher:
    def __init__(
        self,
        nats_url: str,
        subjects: Subjects,
        loop: PublishedLoop,
        registration: Callable[[], WorkerRegistration],
        *,
        auth: BusAuth | None = None,
        load_interval_s: float = 0.1,
        heartbeat_interval_s: float = 1.0,
        stop_timeout_s: float = STOP_TIMEOUT_S,
        tokenizer_bundle: bytes | None = None,
    ) -> None:
        """`tokenizer_bundle`: the encoded `TokenizerFiles` the registration names by hash; stored in
        the object store before the first registration, so that no gateway looks for it in vain."""
        self.nats_url = nats_url
        self.auth = auth or BusAuth()
        self.tokenizer_bundle = tokenizer_bundle
        self.subjects = subjects
        self.loop = loop
        self.registration = registration
        first = registration()
        self.worker_id = first.worker_id
        self.epoch = first.epoch
        self.load_interval_s = load_interval_s
        self.heartbeat_interval_s = heartbeat_interval_s
        self.stop_timeout_s = stop_timeout_s
        self.nc: NATS | None = None
        self.next_seq = 0
        self.batches_published = 0
        self.batches_dropped = 0
        self._pending: list[KvEvent] = []
        self._outbox: asyncio.Queue[KvEventBatch] = asyncio.Queue()
        self._wake = asyncio.Event()
        self._finished_since_batch = False
        self._tasks: list[asyncio.Task[Any]] = []
        # session id -> its pending prefetch and the hashes it lists, oldest first
        self._prefetches: dict[str, tuple[asyncio.TimerHandle, int]] = {}
        self._prefetch_hashes = 0  # listed by the pending prefetches together
        self.paused = False  # no heartbeat while set: the worker is off the bus (a bridged engine down)
        self.ready = asyncio.Event()  # connected, stream and bucket in place, subscriptions on the server
        loop.on_events = self.add_events
        loop.on_finished = self._request_finished

    # --- lifecycle

    async def start(self) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(self._connect(), name="nats-connect"))

    async def stop(self) -> None:
        """Stop the tasks, flush what is queued, deregister and close: returns within `stop_timeout_s`
        whatever NATS does (a worker's shutdown must not hang on a frozen or vanished server)."""
        budget = self.stop_timeout_s
        for session_id in list(self._prefetches):
            self._cancel_prefetch(session_id)
        # tasks that ignore their cancel are kept, so that a second stop() tries them again
        self._tasks = await cancel_and_wait(self._tasks, budget * 0.4)
        nc, self.nc = self.nc, None
        if nc is None:
            return
        if nc.is_connected:
            self.take_batch()
            with contextlib.suppress(Exception):
                await wait_for_bounded(
                    self._flush_and_deregister(nc), budget * 0.3, name="nats-final-flush", grace=budget * 0.05
                )
        with contextlib.suppress(Exception):
            await wait_for_bounded(nc.close(), budget * 0.2, name="nats-close", grace=budget * 0.05)

    async def _flush_and_deregister(self, nc: NATS) -> None:
        with contextlib.suppress(Exception):
            await self._publish_batches(nc)
        kv = await nc.jetstream().key_value(self.subjects.registry_bucket)
        await kv.delete(self.worker_id)

    async def _connect(self) -> None:
        try:
            await self._connect_and_set_up()
        except asyncio.CancelledError:
            raise
        except Exception:
            # a malformed URL or a refused JetStream: HTTP serving goes on, the log says why
            log.exception("NATS set-up failed; this worker publishes nothing")

    async def _connect_and_set_up(self) -> None:
        nc = await nats.connect(
            self.nats_url,
            name=f"kvgate-worker-{self.worker_id}",
            allow_reconnect=True,
            max_reconnect_attempts=-1,  # also retries the first connection until NATS is up
            reconnect_time_wait=0.5,
            connect_timeout=2.0,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
            **self.auth.connect_options(),
        )
        self.nc = nc
        log.info("connected to NATS at %s", redact_url(self.nats_url))
        while True:
            try:
                await self._ensure_stream(nc)
                await self._ensure_bucket(nc)
                await self._store_tokenizer(nc)
                break
            except Exception as exc:  # NATS went away mid-setup, or JetStream is not ready yet
                log.warning("JetStream setup failed, retrying: %s", exc)
                await asyncio.sleep(1.0)
        await nc.subscribe(self.subjects.dump(self.worker_id), cb=self._on_dump)
        await nc.subscribe(self.subjects.pin(self.worker_id), cb=self._on_pin)
        # subscribe() only queues a SUB for the client's flusher, and a hint published before the
        # server has it is dropped: a round trip first, before anyone is told this worker is ready
        await self._round_trip(nc)
        create = asyncio.get_running_loop().create_task
        self._tasks += [
            create(self._heartbeat(nc), name="nats-heartbeat"),
            create(self._report_load(nc), name="nats-load"),
            create(self._publish_events(nc), name="nats-kv-events"),
        ]
        self.ready.set()

    async def _round_trip(self, nc: NATS) -> None:
        """Until the server has answered a request sent after everything queued so far. A request's
        PUB goes through the client's queue behind the SUBs; nats-py's `flush()` is no such proof: it
        writes its PING straight to the socket, ahead of the commands still queued. (NATS away: the
        client sends its subscriptions again on reconnect, before anything else.)"""
        while True:
            try:
                await nc.jetstream().stream_info(self.subjects.kv_stream)
                return
            except nats.js.errors.APIError:
                return  # an error answer is an answer all the same
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("NATS round trip failed, retrying: %s", exc)
                await asyncio.sleep(1.0)

    async def _ensure_stream(self, nc: NATS) -> None:
        js = nc.jetstream()
        try:
            await js.stream_info(self.subjects.kv_stream)
        except NotFoundError:
            try:
                await js.add_stream(kv_stream_config(self.subjects.kv_stream, self.subjects.kv_all))
            except nats.js.errors.BadRequestError:
                await js.stream_info(self.subjects.kv_stream)  # another worker created it first

    async def _ensure_bucket(self, nc: NATS) -> None:
        js = nc.jetstream()
        try:
            await js.key_value(self.subjects.registry_bucket)
        except (BucketNotFoundError, NotFoundError):
            try:
                await js.create_key_value(bucket=self.subjects.registry_bucket, history=1, ttl=REGISTRY_TTL_S)
            except nats.js.errors.BadRequestError:
                await js.key_value(self.subjects.registry_bucket)

    async def _store_tokenizer(self, nc: NATS) -> None:
        if self.tokenizer_bundle is not None:
            await store_tokenizer(nc, self.subjects.tokenizer_bucket, self.tokenizer_bundle)

    async def _on_error(self, exc: Exception) -> None:
        log_nats_error(log, exc)

    async def _on_disconnected(self) -> None:
        if self.nc is None:
            return  # `stop` took the connection and closes it: not a loss of NATS
        log.warning("disconnected from NATS; serving on, reconnecting")

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS")

    # --- KV events

    def add_events(self, events: list[KvEvent]) -> None:
        """Called after each engine step with that step's events (never empty)."""
        if len(self._pending) + len(events) > MAX_PENDING_EVENTS:
            # the bus has been away too long: drop, and burn a sequence number so subscribers resync
            self._pending.clear()
            self.next_seq += 1
            self.batches_dropped += 1
            return
        self._pending.extend(events)
        self._wake.set()

    def _request_finished(self) -> None:
        self._finished_since_batch = True

    def take_batch(self) -> KvEventBatch | None:
        """Turn the pending events into the next batch (queued for publishing)."""
        if not self._pending:
            return None
        batch = KvEventBatch(self.worker_id, self.epoch, self.next_seq, time.time(), self._pending)
        self._pending = []
        self.next_seq += 1
        self._finished_since_batch = False
        self._outbox.put_nowait(batch)
        return batch

    async def _publish_events(self, nc: NATS) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self.take_batch()
            await self._publish_batches(nc)

    async def _publish_batches(self, nc: NATS) -> None:
        js = nc.jetstream()
        while not self._outbox.empty():
            batch = self._outbox.get_nowait()
            subject = self.subjects.kv(self.worker_id)
            headers = {"Nats-Msg-Id": f"{self.worker_id}-{self.epoch}-{batch.seq}"}
            try:
                await js.publish(subject, encode(batch), timeout=2.0, headers=headers)
                self.batches_published += 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away: the gap makes subscribers ask for a dump
                self.batches_dropped += 1
                log.warning("KV batch %d not published: %s", batch.seq, exc)
                with contextlib.suppress(Exception):
                    await self._ensure_stream(nc)  # NATS may have restarted without its store

    # --- state dumps and pins

    async def _on_dump(self, msg: Any) -> None:
        try:
            decode(msg.data, StateDumpRequest)
        except ProtocolError as exc:
            log.warning("ignoring a malformed dump request: %s", exc)
            return
        dump = await self.loop.call(self._dump)
        self._wake.set()  # publish the batch the dump flushed
        with contextlib.suppress(Exception):
            await msg.respond(encode(dump))

    def _dump(self) -> KvStateDump:
        """Runs between steps: the cached set includes every event emitted so far, so flush those into
        a batch first and give the dump that batch's sequence number."""
        self.take_batch()
        return KvStateDump(self.worker_id, self.epoch, self.next_seq - 1, self.loop.engine.cached_blocks())

    async def _on_pin(self, msg: Any) -> None:
        try:
            hint = decode(msg.data, PinHint)
        except ProtocolError as exc:
            log.warning("ignoring a malformed pin hint: %s", exc)
            return
        ttl = _seconds(hint.ttl_s, 3600.0)
        host_ttl = _seconds(hint.host_ttl_s, 4 * 3600.0)
        engine = self.loop.engine
        await self.loop.call(lambda: engine.pin(hint.session_id, hint.block_hashes, ttl, host_ttl))
        if engine.has_host_tier and 0 < hint.prefetch_after_s <= 3600.0:
            self._schedule_prefetch(hint.session_id, hint.block_hashes, hint.prefetch_after_s)

    @property
    def pending_prefetches(self) -> list[str]:
        """The sessions whose prefetch is scheduled, oldest first."""
        return list(self._prefetches)

    def _schedule_prefetch(self, session_id: str, block_hashes: list[int], after_s: float) -> None:
        """One pending prefetch per session, replaced by a newer hint; together they list at most
        `MAX_PREFETCH_HASHES` hashes for at most `MAX_PREFETCH_SESSIONS` sessions (the oldest dropped
        first, a longer one cut to its first blocks)."""
        self._cancel_prefetch(session_id)
        hashes = block_hashes[:MAX_PREFETCH_HASHES]
        if not hashes:
            return
        while (
            self._prefetch_hashes + len(hashes) > MAX_PREFETCH_HASHES
            or len(self._prefetches) >= MAX_PREFETCH_SESSIONS
        ):
            self._cancel_prefetch(next(iter(self._prefetches)))
        timer = asyncio.get_running_loop().call_later(after_s, self._start_prefetch, session_id, hashes)
        self._prefetches[session_id] = (timer, len(hashes))
        self._prefetch_hashes += len(hashes)

    def _cancel_prefetch(self, session_id: str) -> None:
        entry = self._prefetches.pop(session_id, None)
        if entry is not None:
            entry[0].cancel()
            self._prefetch_hashes -= entry[1]

    def _start_prefetch(self, session_id: str, block_hashes: list[int]) -> None:
        entry = self._prefetches.pop(session_id, None)
        if entry is not None:
            self._prefetch_hashes -= entry[1]
        task = asyncio.get_running_loop().create_task(self.loop.prefetch(block_hashes))
        self._tasks.append(task)
        task.add_done_callback(self._tasks.remove)

    # --- load and heartbeat

    async def _report_load(self, nc: NATS) -> None:
        subject = self.subjects.load(self.worker_id)
        engine = self.loop.engine
        while True:
            load = await self.loop.call(engine.load)
            report = load.report(self.worker_id, time.time())
            with contextlib.suppress(Exception):
                await nc.publish(subject, encode(report))
            await asyncio.sleep(self.load_interval_s)

    async def deregister(self) -> None:
        """Delete this worker's registry entry now (the gateway drops it at once); `paused` keeps the
        heartbeat from writing it again."""
        nc = self.nc
        if nc is None or not nc.is_connected:
            return
        try:
            kv = await nc.jetstream().key_value(self.subjects.registry_bucket)
            await kv.delete(self.worker_id)
        except Exception as exc:  # NATS away: the entry lapses with its heartbeat anyway
            log.warning("deregistration failed: %s", exc)

    async def _heartbeat(self, nc: NATS) -> None:
        js = nc.jetstream()
        while True:
            try:
                if not self.paused:
                    kv = await js.key_value(self.subjects.registry_bucket)
                    await kv.put(self.worker_id, encode(self.registration()))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("heartbeat failed: %s", exc)
                with contextlib.suppress(Exception):
                    await self._ensure_bucket(nc)  # NATS restarted without its store
            if self._finished_since_batch and not self._pending:
                # requests finished without changing the cache: an empty batch tells subscribers
                # that events still flow (the gateway falls back to approximate routing otherwise)
                self._pending = []
                self._finished_since_batch = False
                self._outbox.put_nowait(
                    KvEventBatch(self.worker_id, self.epoch, self.next_seq, time.time(), [])
                )
                self.next_seq += 1
                self._wake.set()
            await asyncio.sleep(self.heartbeat_interval_s)


async def store_tokenizer(nc: NATS, bucket: str, bundle: bytes) -> None:
    """Put an encoded `TokenizerFiles` in the object store under its hash, unless it is there."""
    name = digest(bundle).removeprefix(HASH_PREFIX)
    js = nc.jetstream()
    try:
        store = await js.object_store(bucket)
    except (BucketNotFoundError, NotFoundError):
        try:
            store = await js.create_object_store(bucket)
        except nats.js.errors.BadRequestError:
            store = await js.object_store(bucket)  # created meanwhile
    try:
        await store.get_info(name)
        return  # stored already (by this model's other workers): content-addressed
    except NotFoundError:
        pass
    await store.put(name, bundle)
    log.info("stored tokenizer %s (%d bytes)", name[:12], len(bundle))


def _seconds(value: float, most: float) -> float:
    """A duration from the bus within [0, most]; NaN, which passes every clamp (max(nan, 0.0) is nan)
    and would make a pin that never expires, is 0."""
    return 0.0 if math.isnan(value) else min(max(value, 0.0), most)
