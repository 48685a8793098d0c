"""The gateway's side of the NATS bus: feeds the router with registrations, KV events and load.

- registry: a watch on the JetStream KV bucket; a worker whose key is deleted, or that has not been
  heard from (a heartbeat in the registry or a load report) for `stale_after_s` while the bus is
  up, is removed together with its blocks.
- KV events: an ordered JetStream consumer from the start of the stream (a restarted gateway
  replays), then live. A gap in a worker's sequence asks that worker for a state dump.
- load reports: plain NATS.
- a worker whose events do not arrive (it said so in its registration, or it served requests and
  no event followed) is routed in approximate mode; the log and /metrics say so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.errors import BucketNotFoundError, NotFoundError

from gateway.metrics import GatewayMetrics
from gateway.registry_read import live_registration, read_registry
from kvutil.bus_auth import BusAuth, redact_url
from kvutil.nats_errors import log_nats_error
from kvutil.outage import Outage
from kvutil.tasks import cancel_and_wait, wait_for_bounded
from router.protocol import (
    KvEventBatch,
    KvStateDump,
    LoadReport,
    PinHint,
    ProtocolError,
    StateDumpRequest,
    Subjects,
    WorkerRegistration,
    decode,
    encode,
)

log = logging.getLogger("kvgate.gateway.bus")

MAX_REFUSED_KEYS = 1024
# workers in the pool at once: each costs the router, the admission queue and /metrics their state, and
# registrations come from the bus; one past it is refused (logged once) until another leaves
MAX_WORKERS = 4096
MAX_REGISTRY_READ = MAX_WORKERS + MAX_REFUSED_KEYS  # keys read at a (re)start of the watch
STOP_TIMEOUT_S = 2.0  # for the tasks, then for the drain (and a close if it cannot drain)
DUMP_ATTEMPTS = 8  # a state dump asked for and not answered is asked again, backing off: 1, 2, 4, ... s
DUMP_RETRY_S = 1.0
DUMP_RETRY_MAX_S = 30.0


class RouterFeed(Protocol):
    """The part of router.router.Router the bus drives."""

    def add_worker(self, registration: WorkerRegistration, now: float) -> None: ...
    def remove_worker(self, worker_id: str) -> None: ...
    def apply_kv_batch(self, batch: KvEventBatch, now: float) -> bool: ...
    def apply_state_dump(self, dump: KvStateDump, now: float) -> bool: ...
    def expect_dump(self, worker_id: str) -> None: ...
    def apply_load(self, report: LoadReport, now: float) -> None: ...
    def expire(self, now: float) -> None: ...


class WorkerState:
    __slots__ = ("approximate", "last_seen", "registration", "unconfirmed_since")

    def __init__(self, registration: WorkerRegistration, now: float) -> None:
        self.registration = registration
        self.last_seen = now  # monotonic time of the last heartbeat we received
        self.unconfirmed_since: float | None = None  # a request finished there, no event since
        self.approximate = not registration.publishes_events


class Bus:
    def __init__(
        self,
        nats_url: str,
        subjects: Subjects,
        router: RouterFeed,
        metrics: GatewayMetrics,
        *,
        gateway_id: str = "gateway",
        auth: BusAuth | None = None,
        stale_after_s: float = 3.0,
        event_timeout_s: float = 5.0,
        on_added: Callable[[WorkerRegistration], None] | None = None,
        on_removed: Callable[[str], None] | None = None,
        on_load: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nats_url = nats_url
        self.auth = auth or BusAuth()
        self.subjects = subjects
        self.router = router
        self.metrics = metrics
        self.gateway_id = gateway_id
        self.stale_after_s = stale_after_s
        self.event_timeout_s = event_timeout_s
        self.on_added = on_added
        self.on_removed = on_removed
        self.on_load = on_load  # after each load report applied
        self.clock = clock
        self.workers: dict[str, WorkerState] = {}
        self.nc: NATS | None = None
        self.registry_synced = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._sending: set[asyncio.Task[None]] = set()  # pin hints on their way out
        self._dumping: set[str] = set()
        self._refused: set[str] = set()  # registry keys already logged as bad
        self._subs: list[Any] = []
        # Where the KV event stream stands: a new replica's snapshot recovery says where to start
        # following; every batch received moves the position (snapshots record it, a reconnect
        # resumes after it).
        self.kv_start_seq = 0
        self.kv_stream_seq = 0
        self.disconnects = 0
        # From a disconnect until the reconnect callback has restarted the workers' clocks: the client
        # says it is connected again before that callback runs, and in between every worker looked
        # silent for the whole outage (both were dropped, with their requests in flight).
        self._bus_down = False
        self._kv_sub: Any = None
        self._registry_task: asyncio.Task[None] | None = None

    # --- lifecycle

    async def start(self) -> None:
        """Returns at once: connecting runs in the background, so the HTTP side (/health, and /ready
        saying "not yet") is up while NATS is still unreachable."""
        self._tasks = [asyncio.create_task(self._connect(), name="kvgate-bus-connect")]

    async def _connect(self) -> None:
        outage = Outage(log, f"NATS at {redact_url(self.nats_url)}")
        while True:
            try:
                self.nc = await nats.connect(
                    self.nats_url,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    connect_timeout=2.0,
                    name=self.gateway_id,
                    error_cb=self._on_error,
                    disconnected_cb=self._on_disconnected,
                    reconnected_cb=self._on_reconnected,
                    **self.auth.connect_options(),
                )
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # not up yet: keep trying, the log says why (once)
                await asyncio.sleep(outage.failed(exc))
        outage.recovered()
        log.info("connected to NATS at %s", redact_url(self.nats_url))
        self._subs.append(await self.nc.subscribe(self.subjects.load_all, cb=self._on_load))
        self._registry_task = asyncio.create_task(self._watch_registry(), name="kvgate-registry")
        self._tasks += [
            self._registry_task,
            asyncio.create_task(self._follow_kv_events(), name="kvgate-kv-events"),
            asyncio.create_task(self._housekeeping(), name="kvgate-housekeeping"),
        ]

    async def _on_error(self, exc: Exception) -> None:
        log_nats_error(log, exc)

    async def _on_disconnected(self) -> None:
        if self.nc is None:
            return  # `stop` took the connection and closes it: not a loss of NATS
        self.disconnects += 1
        self._bus_down = True
        log.warning("disconnected from NATS; routing on the last known view, reconnecting")

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS")
        now = self.clock()
        for state in self.workers.values():  # heartbeats could not reach us: time starts again
            state.last_seen = now
        self._bus_down = False
        self._tasks = [task for task in self._tasks if not task.done()]
        self._tasks.append(asyncio.get_running_loop().create_task(self._resync(), name="kvgate-resync"))

    async def _resync(self) -> None:
        """After a reconnect. NATS may have restarted: its consumers are gone, and our registry watch
        and KV stream consumer would stall until their heartbeats time out (the workers' heartbeats
        unseen meanwhile). So watch the registry again, follow the stream again after the last batch
        received, and ask every worker for its state: what it published while NATS was away is lost."""
        if self._registry_task is not None:  # gone before the new watch starts, or given up on
            await cancel_and_wait([self._registry_task], STOP_TIMEOUT_S)
        self._registry_task = asyncio.create_task(self._watch_registry(), name="kvgate-registry")
        self._tasks.append(self._registry_task)
        if self.registry_synced.is_set():  # else the first follow is still waiting and subscribes itself
            for _ in range(120):  # JetStream takes a moment to recover its streams after a restart
                if await self._subscribe_kv():
                    break
                await asyncio.sleep(0.5)
        for wid in list(self.workers):
            self._request_dump(wid)

    async def stop(self) -> None:
        """Stop the tasks, then drain the connection (close it if it cannot drain: NATS away), each
        within a bound: a gateway's shutdown never hangs on NATS."""
        self._tasks = await cancel_and_wait(self._tasks, STOP_TIMEOUT_S)  # a second stop tries again
        nc, self.nc = self.nc, None
        if nc is None:
            return
        with contextlib.suppress(Exception):
            await wait_for_bounded(nc.drain(), STOP_TIMEOUT_S, name="kvgate-bus-drain")
        if not nc.is_closed:  # drain refuses while reconnecting: close, or it reconnects forever
            with contextlib.suppress(Exception):
                await wait_for_bounded(nc.close(), STOP_TIMEOUT_S, name="kvgate-bus-close")

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    def publish_pin(self, worker_id: str, hint: PinHint) -> None:
        """Fire and forget: a pin is a hint, never worth delaying a response for."""
        nc = self.nc
        if nc is not None and nc.is_connected:
            task = asyncio.get_running_loop().create_task(
                self._publish(nc, self.subjects.pin(worker_id), encode(hint))
            )
            self._sending.add(task)  # the loop keeps only weak references: unheld, it may vanish mid-run
            task.add_done_callback(self._sending.discard)

    async def _publish(self, nc: NATS, subject: str, data: bytes) -> None:
        # publish only buffers (flushed by the client); while NATS is away the buffer is bounded and a
        # full one raises: the hint is lost, as a hint may be
        with contextlib.suppress(Exception):
            await nc.publish(subject, data)

    # --- registry

    async def _watch_registry(self) -> None:
        assert self.nc is not None
        js = self.nc.jetstream()
        outage = Outage(log, "the registry bucket")
        while True:
            try:
                kv = await js.key_value(self.subjects.registry_bucket)
            except (BucketNotFoundError, NotFoundError):
                self.registry_synced.set()  # no worker ever registered: nothing to wait for
                await asyncio.sleep(0.5)
                continue
            except Exception as exc:  # NATS down or slow: keep trying, the log says why (once)
                await asyncio.sleep(outage.failed(exc))
                continue
            outage.recovered()
            try:
                # the registry as the server holds it, then its changes; not the watch's end-of-initial-
                # values marker, which can overtake the values (gateway/registry_read.py)
                for key, value in await read_registry(js, self.subjects.registry_bucket, MAX_REGISTRY_READ):
                    self._on_registry_entry(key, value, "PUT")
                self.registry_synced.set()
                watcher = await kv.watchall()
                async for entry in watcher:
                    if entry is not None:  # None: the watch's marker, read above already
                        self._on_registry_entry(entry.key, entry.value, entry.operation)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("registry watch failed, restarting it: %s", exc)
                await asyncio.sleep(1.0)

    def _on_registry_entry(self, key: str, value: bytes | None, operation: str | None) -> None:
        if operation in ("DEL", "PURGE") or not value:
            self.remove_worker(key, "deregistered")
            return
        try:
            registration = live_registration(key, value, self.stale_after_s)
        except ProtocolError as exc:
            self._refuse(key, str(exc))
            return
        if registration is None:
            return
        if key not in self.workers and len(self.workers) >= MAX_WORKERS:
            self._refuse(key, f"the pool has {MAX_WORKERS} workers already")
            return
        self._refused.discard(key)
        self._upsert(registration)

    def _refuse(self, key: str, problem: str) -> None:
        """One log line per bad entry, not one per heartbeat (bounded: keys come from the bus)."""
        if key in self._refused or len(self._refused) >= MAX_REFUSED_KEYS:
            return
        self._refused.add(key)
        log.warning("ignoring registry entry %r: %s", key[:128], problem)
        self.metrics.bad_registrations.inc()

    def _upsert(self, registration: WorkerRegistration) -> None:
        now = self.clock()
        state = self.workers.get(registration.worker_id)
        if state is not None and state.registration.epoch == registration.epoch:
            state.last_seen = now
            state.registration = registration
            return
        if state is not None:
            self.remove_worker(registration.worker_id, "restarted")
        self.workers[registration.worker_id] = state = WorkerState(registration, now)
        self.router.add_worker(registration, now)
        self.metrics.of_worker(self.metrics.approximate, registration.worker_id).set(int(state.approximate))
        log.info(
            "worker %s joined: %s model=%s engine=%s block_size=%d%s",
            registration.worker_id,
            registration.url,
            registration.model,
            registration.engine,
            registration.block_size,
            "" if registration.publishes_events else " (approximate mode: no events)",
        )
        self._count()
        if self.on_added is not None:
            self.on_added(registration)

    def remove_worker(self, worker_id: str, reason: str) -> None:
        if self.workers.pop(worker_id, None) is None:
            return
        self.router.remove_worker(worker_id)
        self.metrics.forget_worker(worker_id)
        log.info("worker %s removed (%s) with its blocks", worker_id, reason)
        self._count()
        if self.on_removed is not None:
            self.on_removed(worker_id)

    def _count(self) -> None:
        self.metrics.workers.set(len(self.workers))
        self.metrics.approximate_workers.set(sum(1 for s in self.workers.values() if s.approximate))

    # --- KV events

    async def _follow_kv_events(self) -> None:
        await self.registry_synced.wait()  # registrations first, so replayed events find their worker
        while not await self._subscribe_kv():
            await asyncio.sleep(0.5)

    async def _subscribe_kv(self) -> bool:
        """(Re)create the ordered consumer of the KV stream: after the last batch received, else from
        `kv_start_seq`, else from the start. False when the stream is not there (yet)."""
        assert self.nc is not None
        js = self.nc.jetstream()
        try:
            info = await js.stream_info(self.subjects.kv_stream)
            start = self.kv_stream_seq + 1 if self.kv_stream_seq else self.kv_start_seq
            if start > info.state.last_seq + 1:
                # the stream is younger than our position: NATS came back without its store
                log.warning("KV stream restarted at seq %d (we were at %d)", info.state.last_seq, start - 1)
                start = self.kv_stream_seq = 0
                for wid in list(self.workers):
                    self._request_dump(wid)
            sub = await js.subscribe(
                self.subjects.kv_all,
                stream=self.subjects.kv_stream,
                ordered_consumer=True,
                deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE if start else api.DeliverPolicy.ALL,
                config=api.ConsumerConfig(opt_start_seq=start) if start else None,
                cb=self._on_kv_message,
                pending_msgs_limit=-1,
                pending_bytes_limit=-1,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the stream appears with the first worker
            log.debug("KV event stream not available yet: %s", exc)
            return False
        old, self._kv_sub = self._kv_sub, sub
        if old is not None:
            with contextlib.suppress(Exception):
                self._subs.remove(old)
                await old.unsubscribe()
        self._subs.append(sub)
        return True

    async def _on_kv_message(self, msg: Any) -> None:
        with contextlib.suppress(Exception):  # every message of the stream has its metadata
            self.kv_stream_seq = max(self.kv_stream_seq, msg.metadata.sequence.stream)
        try:
            batch = decode(msg.data, KvEventBatch)
        except ProtocolError as exc:
            log.warning("dropping a malformed KV batch on %s: %s", msg.subject, exc)
            return
        state = self.workers.get(batch.worker_id)
        if state is None or state.registration.epoch != batch.epoch:
            return  # an old process's events (replayed), or a worker not registered (yet)
        now = self.clock()
        state.unconfirmed_since = None
        self.metrics.of_worker(self.metrics.event_lag, batch.worker_id).set(max(0.0, time.time() - batch.ts))
        if state.approximate and state.registration.publishes_events:
            self._set_approximate(state, False)
        if not self.router.apply_kv_batch(batch, now):
            self._request_dump(batch.worker_id)

    def _request_dump(self, worker_id: str) -> None:
        if worker_id in self._dumping:
            return
        self._dumping.add(worker_id)
        self.router.expect_dump(worker_id)
        self.metrics.state_dumps.labels(worker_id).inc()
        self._tasks = [task for task in self._tasks if not task.done()]
        self._tasks.append(asyncio.get_running_loop().create_task(self._dump(worker_id), name="kvgate-dump"))

    async def _dump(self, worker_id: str) -> None:
        again = False
        try:
            for attempt in range(DUMP_ATTEMPTS):
                if attempt:  # no gap may come to ask again: an idle worker publishes nothing
                    await asyncio.sleep(min(DUMP_RETRY_S * 2 ** (attempt - 1), DUMP_RETRY_MAX_S))
                    if worker_id not in self.workers:
                        return
                try:
                    assert self.nc is not None
                    reply = await self.nc.request(
                        self.subjects.dump(worker_id), encode(StateDumpRequest(self.gateway_id)), timeout=5.0
                    )
                    dump = decode(reply.data, KvStateDump)
                except Exception as exc:  # timeout, no responder (not back on the bus yet), malformed
                    log.warning("worker %s: state dump failed (attempt %d): %s", worker_id, attempt + 1, exc)
                    continue
                state = self.workers.get(worker_id)
                if state is not None and state.registration.epoch == dump.epoch:
                    again = not self.router.apply_state_dump(dump, self.clock())
                    log.info("worker %s: state dump applied (%d blocks)", worker_id, len(dump.blocks))
                return
        finally:
            self._dumping.discard(worker_id)
            if again:  # too much happened while it was on its way: the dump cannot be patched up
                self._request_dump(worker_id)

    # --- load

    async def _on_load(self, msg: Any) -> None:
        try:
            report = decode(msg.data, LoadReport)
        except ProtocolError as exc:
            log.warning("dropping a malformed load report on %s: %s", msg.subject, exc)
            return
        state = self.workers.get(report.worker_id)
        if state is None:
            return
        now = self.clock()
        # a sign of life: after a NATS restart load reports flow again at once, while the registry's
        # heartbeats wait for JetStream to recover its streams (seconds on a loaded machine)
        state.last_seen = now
        self.router.apply_load(report, now)
        if self.on_load is not None:
            self.on_load()
        wid = report.worker_id
        metrics = self.metrics
        metrics.of_worker(metrics.worker_running, wid).set(report.running)
        metrics.of_worker(metrics.worker_waiting, wid).set(report.waiting)
        if report.total_blocks > 0:
            metrics.of_worker(metrics.worker_kv_usage, wid).set(report.used_blocks / report.total_blocks)

    # --- approximate mode

    def request_finished(self, worker_id: str) -> None:
        """A request completed on a worker: its cache changed, so events must follow soon."""
        state = self.workers.get(worker_id)
        if state is not None and state.unconfirmed_since is None:
            state.unconfirmed_since = self.clock()

    def _set_approximate(self, state: WorkerState, approximate: bool) -> None:
        state.approximate = approximate
        wid = state.registration.worker_id
        self.metrics.of_worker(self.metrics.approximate, wid).set(int(approximate))
        self._count()
        if approximate:
            log.warning(
                "worker %s: no KV events for %.0f s after serving requests; routing it in approximate mode",
                wid,
                self.event_timeout_s,
            )
        else:
            log.info("worker %s: KV events arrive again; exact routing", wid)
        # the router switches mode on the registration's publishes_events flag
        self.router.remove_worker(wid)
        self.router.add_worker(
            msgspec.structs.replace(state.registration, publishes_events=not approximate), self.clock()
        )
        if not approximate:
            self._request_dump(wid)

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            now = self.clock()
            if not self.connected or self._bus_down:
                # a NATS outage says nothing about the workers: keep routing on the last known view
                continue
            for wid, state in list(self.workers.items()):
                if now - state.last_seen > self.stale_after_s:
                    self.remove_worker(wid, f"no heartbeat for {now - state.last_seen:.1f} s")
                elif (
                    not state.approximate
                    and state.unconfirmed_since is not None
                    and now - state.unconfirmed_since > self.event_timeout_s
                ):
                    self._set_approximate(state, True)
            self.router.expire(now)
