"""The operators' endpoints: `/health`, `/ready` and `/metrics`."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway.errors import ApiError
from gateway.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from gateway.app import Gateway


class Probes:
    """Liveness, readiness and the Prometheus page of a `Gateway`."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def register(self, app: web.Application) -> None:
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.metrics_endpoint)

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        """200 once this replica has workers and an index caught up with the stream.

        A replica that loses NATS afterwards stays ready, saying `"degraded": true`: it still routes on
        its last view (workers, index, its own in-flight picks), and a readiness probe that failed on
        a bus outage would take every replica out of rotation at once, turning a degraded gateway into
        a down one. Before its first view (no workers, or the index still catching up) it is not ready.
        """
        gateway = self.gateway
        _require(request, gateway.config.ready_key)
        workers = len(gateway.bus.workers)
        connected = gateway.bus.connected
        index_ready = gateway.replication.index_ready
        ok = workers > 0 and index_ready
        body: dict[str, Any] = {
            "ready": ok,
            "nats": connected,
            "degraded": not connected,
            "index_ready": index_ready,
            "workers": workers,
        }
        if not ok:
            body["reason"] = "index catching up" if not index_ready else "no workers"
        elif not connected:
            body["reason"] = "NATS unreachable: routing on the last known view"
        return web.json_response(body, status=200 if ok else 503)

    async def metrics_endpoint(self, request: web.Request) -> web.Response:
        gateway = self.gateway
        _require(request, gateway.config.metrics_key)
        gateway.metrics.queued.set(gateway.admission.queued)
        for wid in gateway.bus.workers:
            gateway.metrics.inflight.labels(wid).set(gateway.admission.inflight(wid))
        gateway.metrics.sessions.set(len(gateway.router.sessions))
        return web.Response(body=gateway.metrics.render(), headers={"content-type": CONTENT_TYPE})


def _require(request: web.Request, key: str | None) -> None:
    """401 unless the request bears `key` (when one is set)."""
    if key is None:
        return
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise ApiError(401, "invalid or missing key", code="invalid_api_key")
