"""The gateway's aiohttp application: OpenAI-compatible endpoints in front of the routed workers.

`Gateway` builds the parts one gateway process holds (router, bus, replication, admission, tokenizers,
upstream pool), wires the API families' endpoints (`gateway.openai_api`, `gateway.anthropic_api`,
`gateway.responses_api`, `gateway.probes`) and starts and stops them; a turn's path is
`gateway.turns`.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from gateway import tenants
from gateway.admission import Admission
from gateway.anthropic_api import AnthropicApi
from gateway.bus import Bus
from gateway.config import GatewayConfig
from gateway.errors import ApiError
from gateway.metrics import GatewayMetrics
from gateway.openai_api import OpenAiApi
from gateway.probes import Probes
from gateway.prompt import PromptEncoder
from gateway.replication import Replication
from gateway.response_store import ResponseStore
from gateway.responses_api import ResponsesApi
from gateway.router_holds import RoomHold, SessionHold
from gateway.tokenizers import Tokenizers, TokenizerUnavailable
from gateway.tracing import TurnTracing
from gateway.turns import Turns
from gateway.upstream import UpstreamPool
from kvutil.tracing import Tracing
from router.chat import Tokenizer
from router.policies.kv_overlap import EXPIRY_S as KV_OVERLAP_EXPIRY_S
from router.protocol import Subjects, WorkerRegistration
from router.router import Router

log = logging.getLogger("kvgate.gateway")

__all__ = ["Gateway", "GatewayConfig"]


class Gateway:
    """Everything one gateway process holds, and the aiohttp application over it."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.router = Router(
            policy=config.policy, config=config.router_config, splits_turns=config.split_turns
        )
        self.subjects = Subjects(config.namespace)
        self.admission = Admission(config.queue_bound, config.queue_timeout_s)
        rc = self.router.config
        hold_s = max(rc.admission_max_hold_s, rc.overload_max_hold_s)
        if self.router.kv_queue is not None:  # Dynamo's queue has no bound: the net is its stale guard
            hold_s = max(hold_s, KV_OVERLAP_EXPIRY_S)
        # session_kv's admission by session, its overload queue, or kv_overlap's Dynamo router queue: a
        # turn waits here before its pick
        self.holds = SessionHold(self.router, hold_s + config.queue_timeout_s)
        # session_kv's room queue or memory hold: a pick waits here while its worker has no KV room for it
        hold_bound_s = max(rc.memory_hold_max_s, rc.memory_hold_crowded_max_s)
        room_s = hold_bound_s if self.router.memory_hold is not None else rc.room_max_hold_s
        self.rooms = RoomHold(self.router, room_s + config.queue_timeout_s)
        self.metrics.watch_holds(
            self.router.hold_stats, lambda: {"before_pick": self.holds.held, "for_room": self.rooms.held}
        )
        self.tokenizers = Tokenizers(self.subjects.tokenizer_bucket, lambda: self.bus.nc)
        cache_bytes = config.prompt_cache_bytes
        self.tenants = tenants.Tenants(config.api_keys, config.tenants)
        self.prompts = PromptEncoder(
            resolve=self._tokenizer, max_bytes=cache_bytes, segment_cache_bytes=cache_bytes
        )
        self.traces = TurnTracing(Tracing("kvgate-gateway", "kvgate.gateway"), config.policy)
        self.bus = Bus(
            config.nats_url,
            self.subjects,
            self.router,
            self.metrics,
            gateway_id=config.gateway_id,
            auth=config.bus_auth,
            stale_after_s=config.stale_after_s,
            on_added=self._worker_added,
            on_removed=self._worker_removed,
            on_load=self.rooms.changed,  # a held pick on that worker may go now
        )
        self.replication = Replication(
            config.nats_url,
            self.subjects,
            self.router,
            self.bus,
            self.metrics,
            replica_id=config.gateway_id,
            auth=config.bus_auth,
            snapshot_interval_s=config.snapshot_interval_s,
            stale_after_s=config.stale_after_s,
        )
        self.upstream = UpstreamPool(
            config.connect_timeout_s, config.read_timeout_s, first_byte_timeout_s=config.first_byte_timeout_s
        )
        if self.traces.enabled:
            self.upstream.trace_headers = self.traces.upstream_headers
        self._urls: dict[str, str] = {}  # worker id -> URL, to abort its requests when it leaves
        bucket = f"kvgate_{config.namespace.replace('-', '_')}_responses"
        self.responses = ResponseStore(bucket, ttl_s=config.responses_ttl_s)
        self.turns = Turns(self)
        self.openai = OpenAiApi(self)

    # --- lifecycle

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[self._errors])
        self.openai.register(app)
        AnthropicApi(self, strip_billing=self.config.strip_anthropic_billing).register(app)
        ResponsesApi(self, self.responses).register(app)
        Probes(self).register(app)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, _app: web.Application) -> None:
        await self.replication.start()  # index recovery from the latest snapshot, then the bus

    async def _stop(self, _app: web.Application) -> None:
        self.traces.shutdown()
        await self.replication.stop()
        await self.bus.stop()
        await self.upstream.close()

    def _worker_added(self, registration: WorkerRegistration) -> None:
        limit = self.config.max_inflight_per_worker or registration.max_num_seqs
        self.admission.set_limit(registration.worker_id, limit)
        self._urls[registration.worker_id] = registration.url
        self.tokenizers.prefetch(registration.tokenizer)

    def _worker_removed(self, worker_id: str) -> None:
        self.admission.remove_worker(worker_id)
        self.rooms.poke()  # what waited for its room goes now, and fails over
        url = self._urls.pop(worker_id, None)
        if url is not None and (aborted := self.upstream.abort(url)):
            log.warning(
                "worker %s left with %d unanswered requests: retrying them elsewhere", worker_id, aborted
            )

    def _tokenizer(self, spec: str) -> Tokenizer:
        tokenizer = self.tokenizers.get(spec)
        if tokenizer is None:
            raise TokenizerUnavailable(f"tokenizer {spec} is not loaded")
        return tokenizer

    # --- cross-cutting

    def direct_routes(self) -> dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]]:
        """The turn endpoints, for a server that reaches them without the application's router and
        middlewares (`gateway.http_server.GatewayRunner`); their errors answered as `_errors` does."""
        return {
            "/v1/chat/completions": functools.partial(
                self._answer, "/v1/chat/completions", self.openai.chat_completions
            ),
            "/v1/completions": functools.partial(self._answer, "/v1/completions", self.openai.completions),
        }

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        # every refusal is counted, under the route's path: a path the client made up is one label
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else "other"
        return await self._answer(endpoint, handler, request)

    async def _answer(self, endpoint: str, handler: Any, request: web.Request) -> web.StreamResponse:
        """`handler`'s answer, or the error response for what it raised (counted under `endpoint`)."""
        try:
            return await handler(request)
        except ApiError as exc:
            self.metrics.count_request(endpoint, exc.status)
            return exc.response()
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            status = 413 if isinstance(exc, web.HTTPRequestEntityTooLarge) else exc.status
            self.metrics.count_request(endpoint, status)
            return ApiError(status, exc.reason or "error").response()
        except ConnectionError:
            raise  # the client went away; nothing to answer
        except Exception:
            log.exception("unexpected error on %s", endpoint)
            self.metrics.count_request(endpoint, 500)
            return ApiError(500, "internal gateway error").response()
