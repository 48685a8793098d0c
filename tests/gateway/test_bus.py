"""The bus feed against a real nats-server and the real router: registry, replayed and live events,
gap -> state dump, heartbeat loss -> removal, approximate mode when events stop arriving, and a stop
that is bounded and closes the connection when NATS has gone away."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator

import nats
import pytest
from nats.js.api import StreamConfig

from gateway import bus as bus_module
from gateway.bus import Bus
from gateway.metrics import GatewayMetrics
from gateway.natsd import NatsServer
from router.hashing import block_hashes
from router.protocol import (
    BlockStored,
    CachedBlock,
    KvEventBatch,
    KvStateDump,
    LoadReport,
    StateDumpRequest,
    Subjects,
    WorkerRegistration,
    decode,
    encode,
)
from router.request import RouteRequest
from router.router import Router
from tests.polling import until

CHAIN = block_hashes(list(range(64)), 16)


def registration(worker: str, epoch: int = 1, **changes: object) -> WorkerRegistration:
    fields = dict(
        worker_id=worker, url="http://127.0.0.1:1", model="m", block_size=16, num_blocks=100,
        engine="mock", epoch=epoch, heartbeat_ts=time.time(),
    )  # fmt: skip
    fields.update(changes)
    return WorkerRegistration(**fields)  # type: ignore[arg-type]


def overlap(router: Router, worker: str) -> int:
    request = RouteRequest(
        request_id=f"probe-{time.monotonic_ns()}", model="m", block_hashes=CHAIN, num_tokens=64
    )
    others = frozenset(w for w in router.workers() if w != worker)
    decision = router.pick(request, time.monotonic(), exclude=others)
    router.on_complete(request.request_id, time.monotonic(), "stop", 0, ok=False)
    return decision.overlap_blocks


@pytest.fixture
async def side(nats_url: str, namespace: str) -> AsyncIterator[tuple[object, object, Subjects]]:
    """The workers' side of the bus: the registry bucket and the KV stream."""
    subjects = Subjects(namespace)
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name=subjects.kv_stream, subjects=[subjects.kv_all], max_age=600))
    kv = await js.create_key_value(bucket=subjects.registry_bucket)
    yield nc, kv, subjects
    await js.delete_stream(subjects.kv_stream)
    await js.delete_key_value(subjects.registry_bucket)
    await nc.close()


def removals(caplog: pytest.LogCaptureFixture) -> dict[str, str]:
    """Each removed worker and why, from the bus's log lines."""
    line = re.compile(r"worker (\S+) removed \((.*)\) with its blocks")
    found = (line.search(record.getMessage()) for record in caplog.records)
    return {m[1]: m[2] for m in found if m}


async def test_replay_then_live_events_gap_dump_and_heartbeat_loss(
    nats_url: str, side: tuple, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kvgate.gateway.bus")
    nc, kv, subjects = side
    js = nc.jetstream()
    await kv.put("w1", encode(registration("w1")))
    # published before the gateway starts: must be replayed from the stream
    await js.publish(
        subjects.kv("w1"), encode(KvEventBatch("w1", 1, 0, time.time(), [BlockStored(CHAIN[:2])]))
    )
    dumps: list[StateDumpRequest] = []

    async def answer_dump(msg: nats.aio.msg.Msg) -> None:
        dumps.append(decode(msg.data, StateDumpRequest))
        blocks = [CachedBlock(h, CHAIN[i - 1] if i else None) for i, h in enumerate(CHAIN)]
        await msg.respond(encode(KvStateDump("w1", 1, 5, blocks)))

    await nc.subscribe(subjects.dump("w1"), cb=answer_dump)
    router = Router(policy="session_kv")
    metrics = GatewayMetrics()
    # stale after 3 s: w1's 0.2 s heartbeats keep it through a loaded machine's stalls
    bus = Bus(nats_url, subjects, router, metrics, stale_after_s=3.0)

    async def heartbeat() -> None:  # w1 stays alive; w2 (below) never heartbeats again
        while True:
            await kv.put("w1", encode(registration("w1")))
            await asyncio.sleep(0.2)

    beating = asyncio.create_task(heartbeat())
    await bus.start()
    try:
        await until(lambda: "w1" in router.workers())
        await until(lambda: overlap(router, "w1") == 2)
        await js.publish(
            subjects.kv("w1"),
            encode(KvEventBatch("w1", 1, 1, time.time(), [BlockStored(CHAIN[2:3], CHAIN[1])])),
        )
        await until(lambda: overlap(router, "w1") == 3)
        # seq 2..4 lost: the gateway asks for the whole state
        await js.publish(subjects.kv("w1"), encode(KvEventBatch("w1", 1, 5, time.time(), [])))
        await until(lambda: bool(dumps) and overlap(router, "w1") == 4)
        await nc.publish(
            subjects.load("w1"), encode(LoadReport("w1", time.time(), 3, 1, 10, 50, 100, 1e4, 1e2))
        )
        await until(lambda: b'kvgate_worker_running{worker="w1"} 3.0' in metrics.render())
        # a second worker that stops heartbeating disappears with its blocks
        await kv.put("w2", encode(registration("w2")))
        await until(lambda: "w2" in router.workers())
        await until(lambda: "w2" not in router.workers())
        assert "w2" not in bus.workers
        # a deleted key removes the worker at once: for the deletion, not its heartbeat going stale
        beating.cancel()
        await kv.delete("w1")
        await until(lambda: "w1" not in router.workers())
        reasons = removals(caplog)
        assert reasons["w1"] == "deregistered" and reasons["w2"].startswith("no heartbeat"), reasons
    finally:
        beating.cancel()
        await bus.stop()


async def test_worker_whose_events_stop_is_routed_approximately(nats_url: str, side: tuple) -> None:
    nc, kv, subjects = side
    router = Router(policy="session_kv")
    metrics = GatewayMetrics()
    bus = Bus(nats_url, subjects, router, metrics, stale_after_s=30.0, event_timeout_s=0.3)
    await bus.start()
    try:
        await kv.put("w1", encode(registration("w1")))
        await kv.put("quiet", encode(registration("quiet", publishes_events=False)))
        await until(lambda: {"w1", "quiet"} <= set(router.workers()))
        assert b'kvgate_worker_approximate_mode{worker="quiet"} 1.0' in metrics.render()
        assert b'kvgate_worker_approximate_mode{worker="w1"} 0.0' in metrics.render()
        bus.request_finished("w1")  # served a request, then no event follows
        await until(lambda: bus.workers["w1"].approximate)
        assert b"kvgate_approximate_workers 2.0" in metrics.render()
        await nc.jetstream().publish(subjects.kv("w1"), encode(KvEventBatch("w1", 1, 0, time.time(), [])))
        await until(lambda: not bus.workers["w1"].approximate)
    finally:
        await bus.stop()


@pytest.mark.slow
async def test_stop_after_nats_went_away_is_bounded_and_closes_the_connection(namespace: str) -> None:
    with NatsServer() as server:
        bus = Bus(server.url, Subjects(namespace), Router(), GatewayMetrics())
        await bus.start()
        await until(lambda: bus.connected and bus.registry_synced.is_set())
        nc = bus.nc
        assert nc is not None
        server.stop()
        await until(lambda: not nc.is_connected)
        started = time.monotonic()
        await asyncio.wait_for(bus.stop(), 30)  # a hang fails here rather than at pytest's timeout
        elapsed = time.monotonic() - started
        # tasks, drain, close: each bounded (+ the cancel grace); the slack is a loaded CI machine's
        assert elapsed < 3 * bus_module.STOP_TIMEOUT_S + 3.0
        assert nc.is_closed  # not left reconnecting to a server that is gone
        assert bus.nc is None and bus._tasks == []


async def test_an_invalid_registration_is_ignored_with_one_log_line(
    nats_url: str, side: tuple, caplog: pytest.LogCaptureFixture
) -> None:
    _, kv, subjects = side
    router = Router(policy="session_kv")
    metrics = GatewayMetrics()
    bus = Bus(nats_url, subjects, router, metrics, stale_after_s=5.0)
    await bus.start()
    try:
        for _ in range(3):  # heartbeats of a bad entry: logged once, never added
            await kv.put("w0", encode(registration("w0", block_size=0)))
            await kv.put("w1", encode(registration("w1", url="file:///etc/passwd")))
            await asyncio.sleep(0.1)
        await kv.put("w2", encode(registration("w2")))
        await until(lambda: "w2" in router.workers())
        assert set(router.workers()) == {"w2"}
        ignored = [r.getMessage() for r in caplog.records if "ignoring registry entry" in r.getMessage()]
        assert len(ignored) == 2 and "block_size" in ignored[0] and "url" in ignored[1]
        assert b"kvgate_bad_registrations_total 2.0" in metrics.render()
    finally:
        await bus.stop()


async def test_a_registration_past_the_pool_cap_waits_for_a_place(
    nats_url: str, side: tuple, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Registrations come from the bus: the pool, and what the gateway keeps per worker, is bounded."""
    monkeypatch.setattr(bus_module, "MAX_WORKERS", 2)
    _, kv, subjects = side
    router = Router(policy="session_kv")
    bus = Bus(nats_url, subjects, router, GatewayMetrics(), stale_after_s=5.0)
    await bus.start()
    try:
        for _ in range(3):  # heartbeats: the third worker is logged once, never added
            for wid in ("w0", "w1", "w2"):
                await kv.put(wid, encode(registration(wid)))
            await asyncio.sleep(0.1)
        await until(lambda: set(router.workers()) == {"w0", "w1"} and "w2" in bus._refused)
        full = [r.getMessage() for r in caplog.records if "workers already" in r.getMessage()]
        assert len(full) == 1 and "'w2'" in full[0]
        await kv.delete("w0")
        await kv.put("w2", encode(registration("w2")))  # its next heartbeat finds a place
        await until(lambda: set(router.workers()) == {"w1", "w2"})
    finally:
        await bus.stop()


async def test_its_own_stop_is_not_logged_as_a_lost_connection(
    nats_url: str, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """nats-py calls the disconnect callback when the bus closes its own connection: a shutdown (every
    Ctrl-C of `kvgate up`) must not warn that NATS was lost or count a disconnect."""
    bus = Bus(nats_url, Subjects(namespace), Router(), GatewayMetrics())
    await bus.start()
    await until(lambda: bus.connected and bus.registry_synced.is_set())
    with caplog.at_level(logging.INFO, logger="kvgate.gateway.bus"):
        await bus.stop()
    assert bus.disconnects == 0
    assert not [r for r in caplog.records if "disconnected" in r.getMessage()]


async def test_load_reports_keep_a_worker_whose_registry_heartbeats_lag(
    nats_url: str, side: tuple, caplog: pytest.LogCaptureFixture
) -> None:
    """After a NATS restart a worker's load reports flow at once while its registry heartbeats wait for
    JetStream to recover: a report is a sign of life, and the worker goes only when both stop."""
    caplog.set_level(logging.INFO, logger="kvgate.gateway.bus")
    nc, kv, subjects = side
    router = Router(policy="session_kv")
    bus = Bus(nats_url, subjects, router, GatewayMetrics(), stale_after_s=1.0)
    await bus.start()
    reporting = True

    async def report() -> None:
        while reporting:
            await nc.publish(
                subjects.load("w1"), encode(LoadReport("w1", time.time(), 0, 0, 0, 0, 100, 1e4, 1e2))
            )
            await asyncio.sleep(0.1)

    reports = asyncio.create_task(report())
    try:
        await kv.put("w1", encode(registration("w1")))  # one heartbeat, then only load reports
        await until(lambda: "w1" in router.workers())
        await asyncio.sleep(3.0)  # three times stale_after_s with no heartbeat in the registry
        assert "w1" in router.workers(), removals(caplog)
        reporting = False
        await until(lambda: "w1" not in router.workers())
        assert removals(caplog)["w1"].startswith("no heartbeat")
    finally:
        reporting = False
        await reports
        await bus.stop()


async def test_workers_silent_through_an_outage_stay_until_the_reconnect_restarts_their_clocks(
    nats_url: str, side: tuple, caplog: pytest.LogCaptureFixture
) -> None:
    """nats-py says the connection is up again before it runs the reconnect callback, which restarts the
    workers' clocks; in between every worker looked silent for the whole outage, and was dropped with
    its requests in flight (a NATS restart under load answered 502s). The bus counts the outage from
    the disconnect callback to the reconnect callback: here the callbacks are called as nats-py does,
    around a connection that stays up, the widest such window."""
    caplog.set_level(logging.INFO, logger="kvgate.gateway.bus")
    _, kv, subjects = side
    router = Router(policy="session_kv")
    bus = Bus(nats_url, subjects, router, GatewayMetrics(), stale_after_s=0.5)
    await bus.start()
    try:
        await kv.put("w1", encode(registration("w1")))
        await until(lambda: "w1" in router.workers())
        await bus._on_disconnected()
        await asyncio.sleep(2.0)  # silent for 4x stale_after_s, housekeeping every 0.5 s, bus connected
        assert bus.connected and "w1" in router.workers(), removals(caplog)
        await bus._on_reconnected()
        assert "w1" in router.workers()
        await until(lambda: "w1" not in router.workers())  # its clock runs again: silent, it goes
        assert removals(caplog)["w1"].startswith("no heartbeat")
    finally:
        await bus.stop()
