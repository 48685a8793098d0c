"""A NATS outage under load: nats-server stopped and restarted (same port, same store) while clients
keep sending. No request that a worker could serve fails, the gateway says it is degraded meanwhile,
and its index agrees with the workers' own state again after the restart (typically within a few
seconds; a loaded machine is given a minute)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
import openai
import pytest

from gateway.natsd import NatsServer
from router.protocol import Subjects
from tests.gateway.conftest import Cluster
from tests.gateway.gateways import RunningGateway, running_gateway, worker_blocks

WORKERS = ("o0", "o1")
DIFFS: list[str] = []  # why the last comparisons failed, for the assertion message
CLIENTS = 6
RESYNC_S = 60.0  # for the index to agree again after the restart, on a loaded machine
SETTLE_S = 10.0  # for the last events of a pause to reach the gateway


class Traffic:
    """The clients' shared switches: `stop` ends them, clearing `go` pauses them between requests."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.go = asyncio.Event()
        self.go.set()
        self.in_flight = 0

    async def quiet(self, timeout_s: float = 30.0) -> None:
        """Pause the clients and wait for their requests in flight to finish."""
        self.go.clear()
        deadline = time.monotonic() + timeout_s
        while self.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


async def load(url: str, client_id: int, traffic: Traffic, statuses: list[str]) -> None:
    """One agent session after another, each turn extending the last, until stopped (bounded)."""
    sdk = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=30.0)
    try:
        for session in range(1000):
            messages = [{"role": "system", "content": f"agent {client_id}.{session} " * 40}]
            for turn in range(4):
                await traffic.go.wait()
                if traffic.stop.is_set():
                    return
                messages.append({"role": "user", "content": f"tool result {turn} " * 30})
                traffic.in_flight += 1
                try:
                    reply = await sdk.chat.completions.create(
                        model="mock",
                        messages=messages,
                        max_tokens=8,
                        extra_headers={"x-session-id": f"c{client_id}-s{session}"},
                    )
                    statuses.append("ok")
                    messages.append({"role": "assistant", "content": reply.choices[0].message.content or ""})
                except openai.APIError as exc:
                    statuses.append(f"{type(exc).__name__}: {exc}")
                finally:
                    traffic.in_flight -= 1
    finally:
        await sdk.close()


async def consistent(gw: RunningGateway, nc: nats.NATS, subjects: Subjects, traffic: Traffic) -> bool:
    """Whether the gateway's index equals the workers' own state. Compared in a pause of the clients
    (their requests in flight finished), since under traffic a worker's cache changes between its dump
    and any moment the gateway could be read at; in the pause the comparison is repeated until the last
    events have arrived, for up to SETTLE_S (an index that lost events stays apart)."""
    await traffic.quiet()
    try:
        deadline = time.monotonic() + SETTLE_S
        while not await same_blocks(gw, nc, subjects):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True
    finally:
        traffic.go.set()


async def served_more_than(statuses: list[str], count: int, timeout_s: float = 60.0) -> None:
    """Until the clients have had more than `count` answers (a loaded machine answers slowly)."""
    deadline = time.monotonic() + timeout_s
    while len(statuses) <= count:
        assert time.monotonic() < deadline, f"no answer beyond the first {count} within {timeout_s} s"
        await asyncio.sleep(0.05)


async def same_blocks(gw: RunningGateway, nc: nats.NATS, subjects: Subjects) -> bool:
    for wid in WORKERS:
        try:
            theirs = await worker_blocks(nc, subjects, wid)
        except Exception as exc:  # the worker not back on the bus yet
            DIFFS.append(f"{wid}: no dump ({type(exc).__name__})")
            return False
        ours = gw.blocks(wid)
        if not theirs or ours != theirs:
            DIFFS.append(f"{wid}: gateway {len(ours)}, worker {len(theirs)}, common {len(ours & theirs)}")
            return False
    return True


@pytest.mark.slow
async def test_a_nats_restart_under_load_loses_no_request_and_the_index_resyncs(
    tmp_path: Path, namespace: str
) -> None:
    with NatsServer() as server:  # its own: stopping the shared one would disturb other tests
        cluster = Cluster(server.url, namespace, tmp_path)
        try:
            for wid in WORKERS:
                cluster.worker(wid, "mock", "--speedup", "200", "--num-blocks", "256")
            for proc in cluster.workers.values():
                await asyncio.to_thread(proc.wait_http, "/health", 60.0)
            async with running_gateway(server.url, namespace, "gw-outage", stale_after_s=3.0) as gw:
                await gw.wait_ready(workers=len(WORKERS))
                await outage(server, gw, Subjects(namespace))
        finally:
            cluster.stop()


async def outage(server: NatsServer, gw: RunningGateway, subjects: Subjects) -> None:
    traffic = Traffic()
    statuses: list[str] = []
    clients = [asyncio.create_task(load(gw.url, i, traffic, statuses)) for i in range(CLIENTS)]
    try:
        await served_more_than(statuses, 0)  # traffic flows
        served_before = len(statuses)
        await asyncio.to_thread(server.stop)
        await asyncio.sleep(4.0)  # past the heartbeat timeout (3 s): the workers must stay in the view
        await served_more_than(statuses, served_before)  # and requests are served without NATS
        status, ready = await gw.get("/ready")
        assert status == 200 and ready["degraded"] is True and ready["nats"] is False, ready
        _, metrics = await gw.get("/metrics")
        assert "kvgate_bus_connected 0.0" in metrics
        served_during = len(statuses)
        await asyncio.to_thread(server.start)
        restarted = time.monotonic()

        nc = await nats.connect(server.url)
        try:
            deadline = restarted + RESYNC_S
            while not await consistent(gw, nc, subjects, traffic):
                assert time.monotonic() < deadline, (
                    f"the index did not match the workers' state within {RESYNC_S} s: {DIFFS[-6:]}"
                )
                await asyncio.sleep(0.25)
            served_after = len(statuses)
            await served_more_than(statuses, served_after + CLIENTS)  # traffic goes on...
            assert await consistent(gw, nc, subjects, traffic), "...and the index drifted under it"
        finally:
            await nc.close()
        status, ready = await gw.get("/ready")
        assert status == 200 and ready["degraded"] is False, ready
    finally:
        traffic.stop.set()
        traffic.go.set()
        await asyncio.gather(*clients)
    failures = [s for s in statuses if s != "ok"]
    assert not failures, failures[:5]
    assert served_before > 0 and served_during > served_before and len(statuses) > served_after
    # the workers' and the gateway's states were compared on a busy index, not an empty one
    assert all(gw.blocks(wid) for wid in WORKERS)
