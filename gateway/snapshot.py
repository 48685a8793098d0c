"""Index snapshots in the NATS object store: a new gateway replica loads the latest one and replays only
the KV event stream's tail after it, instead of the whole stream.

- `SnapshotStore`: the namespace's object store bucket; one object, the latest snapshot (a put
  replaces the previous one, so the bucket holds one snapshot's chunks at a time).
- `Snapshotter`: every `interval_s`, a replica whose index is caught up takes a snapshot unless
  another replica stored one within the interval (every replica may take them; they race harmlessly).
- `IndexRecovery`: at start-up, before the bus follows the stream: load the latest snapshot (its
  index and its session bindings), replay the stream's tail after it, and tell where the bus resumes;
  once the registry is read, forget workers that are gone, empty those that restarted since, and ask
  state dumps where events were lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import api
from nats.js.errors import (
    BadRequestError,
    BucketNotFoundError,
    NotFoundError,
    ObjectNotFoundError,
)

from gateway.bus import MAX_REGISTRY_READ, MAX_WORKERS
from gateway.registry_read import live_registration, read_registry
from router.protocol import (
    KvEventBatch,
    KvStateDump,
    ProtocolError,
    StateDumpRequest,
    Subjects,
    decode,
    encode,
)
from router.router import Router
from router.snapshot import (
    IndexSnapshot,
    apply_sessions,
    apply_snapshot,
    capture,
    decode_snapshot,
    encode_snapshot,
    snapshot_of,
)

log = logging.getLogger("kvgate.gateway.snapshot")

SNAPSHOT_OBJECT = "index"
MAX_SNAPSHOT_BYTES = 1 << 30  # the bucket's bound: a 1M-block index takes ~8 MB


class SnapshotStore:
    def __init__(self, nc: NATS, subjects: Subjects) -> None:
        self.nc = nc
        self.bucket = subjects.snapshot_bucket
        self._store: Any = None

    async def _objects(self, create: bool) -> Any:
        if self._store is not None:
            return self._store
        js = self.nc.jetstream()
        try:
            self._store = await js.object_store(self.bucket)
        except NotFoundError:
            if not create:
                return None
            config = api.ObjectStoreConfig(
                bucket=self.bucket,
                description="kvgate index snapshots",
                max_bytes=MAX_SNAPSHOT_BYTES,
                storage=api.StorageType.FILE,
            )
            try:
                self._store = await js.create_object_store(self.bucket, config=config)
            except BadRequestError:  # another replica created it first
                self._store = await js.object_store(self.bucket)
        return self._store

    async def put(self, snapshot: IndexSnapshot) -> int:
        """Store `snapshot` as the latest; returns its size in bytes."""
        data = encode_snapshot(snapshot)
        store = await self._objects(create=True)
        meta = api.ObjectMeta(name=SNAPSHOT_OBJECT, description=repr(snapshot.created_ts))
        await store.put(SNAPSHOT_OBJECT, data, meta=meta)
        return len(data)

    async def get(self) -> tuple[IndexSnapshot, int] | None:
        """The latest snapshot and its size, or None when there is none (or it cannot be read)."""
        store = await self._objects(create=False)
        if store is None:
            return None
        try:
            # read whole: within the bound only (a bucket made elsewhere may lack its max_bytes)
            info = await store.get_info(SNAPSHOT_OBJECT)
            if info.size is not None and info.size > MAX_SNAPSHOT_BYTES:
                log.warning(
                    "ignoring the stored index snapshot: %d bytes, over %d", info.size, MAX_SNAPSHOT_BYTES
                )
                return None
            result = await store.get(SNAPSHOT_OBJECT)
        except ObjectNotFoundError:
            return None
        data = result.data or b""
        try:
            return decode_snapshot(data), len(data)
        except ProtocolError as exc:
            log.warning("ignoring the stored index snapshot: %s", exc)
            return None

    async def created_ts(self) -> float | None:
        """When the latest snapshot was taken (wall clock), from its metadata; None when there is none."""
        store = await self._objects(create=False)
        if store is None:
            return None
        try:
            info = await store.get_info(SNAPSHOT_OBJECT)
        except ObjectNotFoundError:
            return None
        try:
            return float(info.description or "")
        except ValueError:
            return None


class Snapshotter:
    """Takes a snapshot of `router` every `interval_s` while `ready()`.

    `position()` is the stream sequence of the last KV batch the router applied; `clock` is the
    router's (the sessions' times are taken relative to it). The index and the session table are
    copied on the event loop, the snapshot built from the copy on a thread.
    """

    def __init__(
        self,
        store: SnapshotStore,
        router: Router,
        position: Callable[[], int],
        ready: Callable[[], bool],
        *,
        interval_s: float = 30.0,
        source: str = "gateway",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.router = router
        self.position = position
        self.ready = ready
        self.interval_s = interval_s
        self.source = source
        self.clock = clock
        self.taken = 0
        self.last_bytes = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away: the next round tries again
                log.warning("index snapshot not stored: %s", exc)

    async def round(self) -> bool:
        """Take a snapshot if this replica is caught up and nobody stored one within the interval."""
        if not self.ready():
            return False  # a partial index must not become the one new replicas load
        latest = await self.store.created_ts()
        if latest is not None and time.time() - latest < 0.9 * self.interval_s:
            return False  # another replica just took one
        await self.take()
        return True

    async def take(self) -> int:
        """Build and store a snapshot now; returns its size in bytes."""
        # copied at one instant on the loop, built on a thread: a 1M-block index takes a second or two,
        # which must not stall the event loop (heartbeats, requests) meanwhile
        captured = capture(self.router, self.clock())
        position = self.position()
        snapshot = await asyncio.to_thread(snapshot_of, captured, position, time.time(), self.source)
        size = await self.store.put(snapshot)
        self.taken += 1
        self.last_bytes = size
        log.info(
            "index snapshot stored: %d blocks of %d workers up to stream seq %d, %d sessions, %d bytes",
            snapshot.num_blocks(),
            len(snapshot.workers),
            snapshot.stream_seq,
            len(snapshot.sessions),
            size,
        )
        return size


class IndexRecovery:
    """Brings a new replica's router up to date from the latest snapshot and the stream's tail."""

    def __init__(
        self,
        nc: NATS,
        subjects: Subjects,
        router: Router,
        *,
        requester: str = "gateway",
        stale_after_s: float = 3.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.nc = nc
        self.subjects = subjects
        self.router = router
        self.store = SnapshotStore(nc, subjects)
        self.requester = requester
        self.stale_after_s = stale_after_s  # the bus's: older registrations are leftovers of dead workers
        self.clock = clock
        self.snapshot: IndexSnapshot | None = None
        self.snapshot_bytes = 0
        self.resume_seq = 0  # the stream sequence the recovery applied up to (the bus follows after it)
        self.replayed = 0  # tail batches applied
        self.sessions_restored = 0  # session bindings imported from the snapshot
        self.lost: set[str] = set()  # workers whose events the tail lacks: they need a state dump
        self.stale = False  # the snapshot is older than the stream's retention: every worker needs one

    async def catch_up(self) -> int:
        """Registry, snapshot, tail; returns the stream sequence the bus resumes after (0: the start)."""
        try:
            info = await self.nc.jetstream().stream_info(self.subjects.kv_stream)
        except NotFoundError:
            await self._sessions_only()
            return 0
        first, last = info.state.first_seq, info.state.last_seq
        await self.register_workers()  # the router applies events of registered workers only
        await self._load_snapshot()
        start = self.snapshot.stream_seq + 1 if self.snapshot is not None else first
        if self.snapshot is not None and first > start:
            self.stale = True  # events between the snapshot and the stream's oldest are gone
            log.warning(
                "index snapshot older than the stream (seq %d < %d): asking every worker", start, first
            )
        start = max(start, first, 1)  # an empty stream says first 0, last 0
        if last >= start:
            await self.replay(start, last)
        self.resume_seq = max(last, self.snapshot.stream_seq if self.snapshot is not None else 0)
        return self.resume_seq

    async def _sessions_only(self) -> None:
        """No worker ever published events (all route approximately): no index to load, but the
        snapshot's sessions still say which worker holds each one's KV."""
        await self.register_workers()
        found = await self.store.get()
        if found is not None:
            self.snapshot, self.snapshot_bytes = found
            self.sessions_restored = apply_sessions(
                self.router, self.snapshot.sessions, self.clock(), self._age(self.snapshot)
            )

    async def _load_snapshot(self) -> None:
        """The newest snapshot, if any, into the router: its index and its sessions."""
        found = await self.store.get()
        if found is None:
            return
        self.snapshot, self.snapshot_bytes = found
        before = len(self.router.sessions)
        age = self._age(self.snapshot)
        loaded = apply_snapshot(self.router, self.snapshot, self.clock(), age)
        self.sessions_restored = len(self.router.sessions) - before
        log.info(
            "index snapshot loaded: %d blocks of %d workers up to stream seq %d, %d of %d sessions "
            "(%d bytes, by %s, %.1f s old)",
            loaded,
            len(self.snapshot.workers),
            self.snapshot.stream_seq,
            self.sessions_restored,
            len(self.snapshot.sessions),
            self.snapshot_bytes,
            self.snapshot.source,
            age,
        )

    @staticmethod
    def _age(snapshot: IndexSnapshot) -> float:
        """Seconds since the snapshot was taken, by the wall clock (0 when the clocks disagree)."""
        return max(0.0, time.time() - snapshot.created_ts)

    async def register_workers(self) -> list[str]:
        """Add the registry's live workers to the router (the bus's registry watch adds the same ones,
        which leaves their blocks alone); returns their ids."""
        bucket = self.subjects.registry_bucket
        try:
            entries = await read_registry(self.nc.jetstream(), bucket, MAX_REGISTRY_READ)
        except (BucketNotFoundError, NotFoundError):
            return []
        added: list[str] = []
        for key, value in entries:
            try:
                registration = live_registration(key, value, self.stale_after_s)
            except ProtocolError:
                continue  # the bus's watch logs it
            if registration is not None and len(added) < MAX_WORKERS:
                self.router.add_worker(registration, self.clock())
                added.append(registration.worker_id)
        return added

    async def replay(self, start: int, last: int) -> None:
        """Apply the stream's batches from `start` through `last` to the router."""
        js = self.nc.jetstream()
        sub = await js.subscribe(
            self.subjects.kv_all,
            stream=self.subjects.kv_stream,
            ordered_consumer=True,
            deliver_policy=api.DeliverPolicy.BY_START_SEQUENCE,
            config=api.ConsumerConfig(opt_start_seq=start),
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )
        router = self.router
        try:
            seq = start - 1
            while seq < last:
                msg = await sub.next_msg(timeout=5.0)
                seq = msg.metadata.sequence.stream
                try:
                    batch = decode(msg.data, KvEventBatch)
                except ProtocolError as exc:
                    log.warning("dropping a malformed KV batch at stream seq %d: %s", seq, exc)
                    continue
                self.replayed += 1
                if not router.apply_kv_batch(batch, self.clock()):
                    self.lost.add(batch.worker_id)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def reconcile(self, registered: dict[str, int]) -> list[str]:
        """Once the registry is read (`registered`: worker id -> epoch): forget indexed workers that
        are not registered, empty those whose process changed and applied nothing newer, and fetch
        the state dump of every worker whose events were lost. Returns the workers dumped."""
        router = self.router
        now = self.clock()
        routable = set(router.workers())
        for wid, (epoch, _seq) in router.stream_positions().items():
            current = registered.get(wid)
            if current is None:
                if wid not in routable:
                    router.remove_worker(wid)  # a process gone since: its blocks must not attract
            elif epoch < current:
                router.apply_state_dump(KvStateDump(wid, current, -1, []), now)
        wanted = set(registered) if self.stale else self.lost & set(registered)
        wanted_ids = sorted(wanted)  # asked together: a silent worker costs one timeout, not one each
        answers = await asyncio.gather(*(self.fetch_dump(wid, registered[wid]) for wid in wanted_ids))
        dumped = [wid for wid, ok in zip(wanted_ids, answers, strict=True) if ok]
        self.lost.clear()
        self.stale = False
        return dumped

    async def fetch_dump(self, worker_id: str, epoch: int) -> bool:
        """Ask one worker for its full block list and load it; False when it did not answer."""
        self.router.expect_dump(worker_id)
        try:
            reply = await self.nc.request(
                self.subjects.dump(worker_id), encode(StateDumpRequest(self.requester, "resync")), timeout=5.0
            )
            dump = decode(reply.data, KvStateDump)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # no responder, timeout, malformed: its next gap asks again
            log.warning("worker %s: state dump failed: %s", worker_id, exc)
            return False
        if dump.epoch != epoch:
            return False
        return self.router.apply_state_dump(dump, self.clock())
