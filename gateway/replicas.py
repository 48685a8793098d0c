"""Gateway replicas agree: each shares its picks, first tokens and completions on
`kvgate.<ns>.replica.route`, and records the others' into its own router.

So a replica counts the prefill and blocks the others just sent to a worker (two replicas do not pile
onto the same idle worker between two load reports), and knows every session's worker and latest chain
(a session's turns land on one worker whichever replica receives them, also for sessions recognised
by their prompt). Notes are fire-and-forget plain NATS: one lost during an outage leaves a prediction
that expires by the router's TTLs, or a binding that the KV events confirm later.

Bounded: at most `max_replicas` other replicas and `max_inflight` predictions of each are tracked; a
replica silent for `replica_timeout_s` has its predictions dropped (it crashed mid-request).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS

from kvutil.tasks import cancel_and_wait
from router.protocol import (
    ProtocolError,
    ReplicaAlive,
    ReplicaNote,
    RouteDone,
    RouteFirstToken,
    RoutePicked,
    Subjects,
    decode_replica_note,
    encode,
)
from router.request import Decision, RouteRequest
from router.router import Router
from router.snapshot import pack_hashes, unpack_hashes

log = logging.getLogger("kvgate.gateway.replicas")

MAX_CHAIN_BLOCKS = 16_384  # 128 KiB packed; longer prompts share their load but not their chain
_U64 = (1 << 64) - 1
STOP_TIMEOUT_S = 2.0  # for the heartbeat task


class Peer:
    __slots__ = ("inflight", "last_seen")

    def __init__(self, now: float) -> None:
        self.last_seen = now
        self.inflight: dict[str, None] = {}  # request ids, oldest first


class ReplicaSync:
    def __init__(
        self,
        subjects: Subjects,
        router: Router,
        replica_id: str,
        *,
        heartbeat_s: float = 1.0,
        replica_timeout_s: float = 5.0,
        max_replicas: int = 64,
        max_inflight: int = 65_536,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.subjects = subjects
        self.router = router
        self.replica_id = replica_id
        self.heartbeat_s = heartbeat_s
        self.replica_timeout_s = replica_timeout_s
        self.max_replicas = max_replicas
        self.max_inflight = max_inflight
        self.clock = clock
        self.peers: dict[str, Peer] = {}
        self.applied = 0  # notes of other replicas recorded
        self.nc: NATS | None = None
        self._sub: Any = None
        self._task: asyncio.Task[None] | None = None
        self._sending: set[asyncio.Task[None]] = set()

    async def start(self, nc: NATS) -> None:
        self.nc = nc
        self._sub = await nc.subscribe(self.subjects.replica_route, cb=self._on_message)
        with contextlib.suppress(Exception):
            await nc.flush(timeout=2)  # the server has our subscription before we route anything
        self._task = asyncio.get_running_loop().create_task(self._heartbeat(), name="kvgate-replicas")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task], STOP_TIMEOUT_S)
            self._task = None
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None

    # --- what this replica did

    def picked(self, request: RouteRequest, decision: Decision) -> None:
        if not self.peers:
            return  # nobody to tell: a lone gateway pays nothing per request (a newcomer is heard at once)
        chain = request.block_hashes
        packed = b""
        if len(chain) <= MAX_CHAIN_BLOCKS:
            with contextlib.suppress(OverflowError):  # a hash outside uint64: share no chain
                packed = pack_hashes(chain)
        self._send(
            RoutePicked(
                self.replica_id,
                request.request_id,
                decision.worker_id,
                request.model,
                request.num_tokens,
                request.expected_output_tokens,
                decision.overlap_blocks,
                request.session_id,
                request.tool_call_pending,
                packed,
            )
        )

    def first_token(self, request_id: str) -> None:
        if self.peers:
            self._send(RouteFirstToken(self.replica_id, request_id))

    def done(self, request_id: str, finish_reason: str | None, output_tokens: int, ok: bool) -> None:
        if self.peers:
            self._send(RouteDone(self.replica_id, request_id, finish_reason, output_tokens, ok))

    def _send(self, note: ReplicaNote) -> None:
        nc = self.nc
        if nc is None or nc.is_closed:
            return
        task = asyncio.get_running_loop().create_task(self._publish(nc, encode(note)))
        self._sending.add(task)  # the loop keeps only weak references to tasks
        task.add_done_callback(self._sending.discard)

    async def _publish(self, nc: NATS, data: bytes) -> None:
        # publish only buffers (flushed by the client); while NATS is away the buffer is bounded and a
        # full one raises: the note is lost, which the TTLs absorb
        with contextlib.suppress(Exception):
            await nc.publish(self.subjects.replica_route, data)

    # --- what the others did

    async def _on_message(self, msg: Any) -> None:
        try:
            note = decode_replica_note(msg.data)
        except ProtocolError as exc:
            log.warning("dropping a malformed replica note: %s", exc)
            return
        try:
            self.apply(note)
        except Exception:  # a bug here must not end the subscription's delivery loop silently
            log.exception("replica note %r not applied", note)

    def apply(self, note: ReplicaNote) -> bool:
        """Record another replica's note; False when ignored (our own, unknown, over a bound)."""
        if note.replica == self.replica_id:
            return False
        now = self.clock()
        peer = self.peers.get(note.replica)
        if peer is None:
            if len(self.peers) >= self.max_replicas:
                return False
            peer = self.peers[note.replica] = Peer(now)
            self._send(ReplicaAlive(self.replica_id))  # let a newcomer know us now, not at our next beat
        peer.last_seen = now
        router = self.router
        if type(note) is RoutePicked:
            return self._record(peer, note, now)
        if type(note) is RouteFirstToken:
            if note.request_id not in peer.inflight:
                return False
            router.on_first_token(self._key(note.replica, note.request_id), now)
        elif type(note) is RouteDone:
            if note.request_id not in peer.inflight:
                return False
            del peer.inflight[note.request_id]
            router.on_complete(
                self._key(note.replica, note.request_id), now, note.finish_reason, note.output_tokens, note.ok
            )
        else:
            return True  # a heartbeat
        self.applied += 1
        return True

    def _record(self, peer: Peer, note: RoutePicked, now: float) -> bool:
        try:
            chain = unpack_hashes(note.chain)
        except ProtocolError:
            return False
        if len(peer.inflight) >= self.max_inflight:  # bounded: its oldest prediction goes
            oldest = next(iter(peer.inflight))
            del peer.inflight[oldest]
            self.router.on_complete(self._key(note.replica, oldest), now, None, 0, ok=False)
        request = RouteRequest(
            self._key(note.replica, note.request_id),
            note.model,
            chain,
            max(0, note.num_tokens),
            note.session_id,
            max(0, note.expected_output_tokens),
            note.tool_call_pending,
        )
        decision = Decision(note.worker_id, max(0, note.overlap_blocks), 0.0, "replica")
        if not self.router.record(request, decision, now):
            return False  # a worker this replica does not know (yet): its load reports will show it
        peer.inflight[note.request_id] = None
        self.applied += 1
        return True

    @staticmethod
    def _key(replica: str, request_id: str) -> str:
        return f"{replica}/{request_id}"  # in-flight ids of different replicas never meet

    # --- liveness

    async def _heartbeat(self) -> None:
        while True:
            self._send(ReplicaAlive(self.replica_id))
            self.expire(self.clock())
            await asyncio.sleep(self.heartbeat_s)

    def expire(self, now: float) -> list[str]:
        """Forget replicas silent for `replica_timeout_s`, with their predictions; returns their ids."""
        gone = [rid for rid, p in self.peers.items() if now - p.last_seen > self.replica_timeout_s]
        for replica in gone:
            peer = self.peers.pop(replica)
            for request_id in peer.inflight:
                self.router.on_complete(self._key(replica, request_id), now, None, 0, ok=False)
            log.info("replica %s silent; dropped its %d in-flight predictions", replica, len(peer.inflight))
        return gone
