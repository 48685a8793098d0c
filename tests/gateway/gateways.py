"""In-process gateways for the scale-out tests: real aiohttp apps on loopback ports, whose routers the
tests can read (the index, the sessions) while real clients talk to them over HTTP."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from gateway.app import Gateway
from gateway.config import GatewayConfig
from router.protocol import KvStateDump, StateDumpRequest, Subjects, decode, encode
from router.snapshot import build_snapshot
from tests.gateway.conftest import WORKER_STALE_AFTER_S
from tests.polling import until
from tests.serving import serving


class RunningGateway:
    def __init__(self, gateway: Gateway, url: str) -> None:
        self.gateway = gateway
        self.url = url
        self.router = gateway.router

    async def get(self, path: str) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as http, http.get(self.url + path) as resp:
            body = await resp.text()
            try:
                return resp.status, await resp.json(content_type=None)
            except ValueError:
                return resp.status, body

    async def wait_ready(self, workers: int, timeout_s: float = 60.0) -> None:
        async def ready() -> bool:
            status, body = await self.get("/ready")
            return status == 200 and body["workers"] >= workers

        await until(ready, timeout_s, f"{self.url} not ready with {workers} workers")

    def blocks(self, worker_id: str) -> set[tuple[int, str]]:
        """The (block, tier) pairs this gateway's index holds for a worker."""
        for worker in build_snapshot(self.router, 0, 0.0).workers:
            if worker.worker_id == worker_id:
                return {(b.block_hash, b.tier) for b in worker.blocks()}
        return set()


@contextlib.asynccontextmanager
async def running_gateway(
    nats_url: str, namespace: str, gateway_id: str, **config: Any
) -> AsyncIterator[RunningGateway]:
    config.setdefault("stale_after_s", float(WORKER_STALE_AFTER_S))
    gateway = Gateway(GatewayConfig(nats_url=nats_url, namespace=namespace, gateway_id=gateway_id, **config))
    async with serving(gateway.app(), handler_cancellation=True, access_log=None) as url:
        yield RunningGateway(gateway, url)


async def worker_blocks(nc: Any, subjects: Subjects, worker_id: str) -> set[tuple[int, str]]:
    """What a worker itself says it holds: its state dump, asked over NATS."""
    reply = await nc.request(
        subjects.dump(worker_id), encode(StateDumpRequest("test", "compare")), timeout=5.0
    )
    dump = decode(reply.data, KvStateDump)
    return {(b.block_hash, b.tier) for b in dump.blocks}
