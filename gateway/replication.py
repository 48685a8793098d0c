"""What makes several gateway replicas one gateway: a replica starts from the latest index snapshot and
the KV stream's tail before its bus follows the stream, takes snapshots in turn with the others, and
shares its picks with them (gateway.replicas).

Its own NATS connection (the bus connects in the background and must not follow the stream before the
recovery says where to start). `/ready` reads `index_ready`; `/metrics` gets `kvgate_bus_connected`
and `kvgate_index_ready`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import nats
from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError
from prometheus_client import Gauge

from gateway.bus import Bus
from gateway.metrics import GatewayMetrics
from gateway.replicas import ReplicaSync
from gateway.snapshot import IndexRecovery, SnapshotStore, Snapshotter
from kvutil.bus_auth import BusAuth, redact_url
from kvutil.nats_errors import log_nats_error
from kvutil.outage import Outage
from kvutil.tasks import cancel_and_wait, wait_for_bounded
from router.protocol import Subjects
from router.router import Router

log = logging.getLogger("kvgate.gateway.replication")

RECOVERY_TIMEOUT_S = 120.0  # past this, the bus replays the whole stream instead
CATCH_UP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 2.0  # for the tasks, then for the close


class Replication:
    def __init__(
        self,
        nats_url: str,
        subjects: Subjects,
        router: Router,
        bus: Bus,
        metrics: GatewayMetrics,
        *,
        replica_id: str,
        auth: BusAuth | None = None,
        snapshot_interval_s: float = 30.0,
        stale_after_s: float = 3.0,
    ) -> None:
        self.nats_url = nats_url
        self.auth = auth or BusAuth()
        self.subjects = subjects
        self.router = router
        self.bus = bus
        self.replica_id = replica_id
        self.snapshot_interval_s = snapshot_interval_s
        self.stale_after_s = stale_after_s
        self.replicas = ReplicaSync(subjects, router, replica_id)
        self.recovery: IndexRecovery | None = None
        self.snapshotter: Snapshotter | None = None
        self.resume_seq = 0  # what the recovery applied up to
        self.index_ready = False  # the index has caught up with the stream once
        self.nc: NATS | None = None
        self._tasks: list[asyncio.Task[None]] = []
        registry = metrics.registry
        Gauge(
            "kvgate_bus_connected", "1 while the gateway is connected to NATS", registry=registry
        ).set_function(lambda: float(bus.connected))
        Gauge(
            "kvgate_index_ready", "1 once the index caught up with the KV event stream", registry=registry
        ).set_function(lambda: float(self.index_ready))
        Gauge(
            "kvgate_replica_peers", "Other gateway replicas heard from recently", registry=registry
        ).set_function(lambda: float(len(self.replicas.peers)))
        Gauge(
            "kvgate_index_snapshot_bytes",
            "Size of the last index snapshot this replica stored",
            registry=registry,
        ).set_function(lambda: float(self.snapshotter.last_bytes if self.snapshotter is not None else 0))

    async def start(self) -> None:
        """Returns at once; recovery, then the bus, then snapshots run in the background."""
        self._tasks.append(asyncio.get_running_loop().create_task(self._run(), name="kvgate-replication"))

    async def stop(self) -> None:
        """Stop recovery and snapshots, then the replica notes, then close: each step bounded."""
        self._tasks = await cancel_and_wait(self._tasks, STOP_TIMEOUT_S)  # a second stop tries again
        await self.replicas.stop()
        nc, self.nc = self.nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await wait_for_bounded(nc.close(), STOP_TIMEOUT_S, name="kvgate-replication-close")

    def position(self) -> int:
        """The stream sequence the router reflects (for snapshots)."""
        return max(self.bus.kv_stream_seq, self.resume_seq)

    async def _run(self) -> None:
        self.nc = nc = await self._connect()
        await self.replicas.start(nc)
        self.recovery = recovery = IndexRecovery(
            nc, self.subjects, self.router, requester=self.replica_id, stale_after_s=self.stale_after_s
        )
        started = time.monotonic()
        try:
            self.resume_seq = await asyncio.wait_for(recovery.catch_up(), timeout=RECOVERY_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the router's positions make a full replay skip what was applied
            log.warning(
                "index recovery failed (%s: %s); replaying the whole KV stream", type(exc).__name__, exc
            )
            self.resume_seq = 0
        self.bus.kv_start_seq = self.resume_seq + 1 if self.resume_seq else 0
        await self.bus.start()
        await self.bus.registry_synced.wait()
        await recovery.reconcile({wid: s.registration.epoch for wid, s in self.bus.workers.items()})
        await self._caught_up()
        self.index_ready = True
        log.info(
            "index ready in %.2f s (snapshot %s, %d tail batches replayed)",
            time.monotonic() - started,
            f"{recovery.snapshot_bytes} bytes" if recovery.snapshot is not None else "none",
            recovery.replayed,
        )
        self.snapshotter = Snapshotter(
            SnapshotStore(nc, self.subjects),
            self.router,
            self.position,
            lambda: self.index_ready and self.bus.connected,
            interval_s=self.snapshot_interval_s,
            source=self.replica_id,
        )
        await self.snapshotter.run()

    async def _connect(self) -> NATS:
        outage = Outage(log, f"NATS at {redact_url(self.nats_url)}")
        while True:
            try:
                nc = await nats.connect(
                    self.nats_url,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    connect_timeout=2.0,
                    name=f"{self.replica_id}-replication",
                    error_cb=_quiet_error,  # the bus's connection says when NATS is down, once
                    **self.auth.connect_options(),
                )
                outage.recovered()
                return nc
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                await asyncio.sleep(outage.failed(exc))

    async def _caught_up(self) -> None:
        """Until the bus has received the stream's last batch as of now (bounded)."""
        assert self.nc is not None
        try:
            info = await self.nc.jetstream().stream_info(self.subjects.kv_stream)
        except NotFoundError:
            return
        target = info.state.last_seq
        deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
        while self.position() < target and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


async def _quiet_error(exc: Exception) -> None:
    log_nats_error(log, exc, "NATS (replication)")  # the bus says when NATS is down
