"""The gateway's aiohttp application: OpenAI-compatible endpoints in front of the routed workers.

A turn: validate, resolve the model's workers, tokenize and hash as they do, resolve the session,
admit (per-worker limits, bounded queue), pick, forward with the token ids, relay, then tell the
router how it went (and send the pin hint it returns).
"""

from __future__ import annotations

import hmac
import itertools
import logging
import time
import uuid
from typing import Any

import msgspec
from aiohttp import web
from opentelemetry.trace import SpanKind

from gateway import tenants
from gateway.admission import Admission, NoWorker, QueueFull, RoomHold, SessionHold
from gateway.anthropic_api import AnthropicApi
from gateway.api_bridge import Relay
from gateway.bus import Bus
from gateway.errors import ApiError
from gateway.metrics import CONTENT_TYPE, GatewayMetrics
from gateway.prompt import PromptEncoder
from gateway.proxy import Outcome, Retryable, forward
from gateway.replication import Replication
from gateway.response_store import ResponseStore
from gateway.responses_api import ResponsesApi
from gateway.session_id import explicit_session_id, header_value, parent_session_id
from gateway.tokenizers import Tokenizers, TokenizerUnavailable
from gateway.tracing import TurnTracing
from gateway.upstream import UpstreamPool
from gateway.validation import Kind, Turn, parse_turn
from kvutil.bus_auth import BusAuth
from kvutil.tracing import Tracing
from router.chat import TemplateError, Tokenizer
from router.config import RouterConfig
from router.protocol import Subjects, WorkerRegistration
from router.request import Decision, RouteRequest
from router.router import Router

log = logging.getLogger("kvgate.gateway")

TOOL_CALL_HEADER = "x-kvgate-tool-call"


class GatewayConfig(msgspec.Struct, frozen=True):
    nats_url: str
    bus_auth: BusAuth = msgspec.field(default_factory=BusAuth)
    namespace: str = "kvgate"
    policy: str = "session_kv"
    api_keys: tuple[str, ...] = ()
    tenants: tuple[tuple[str, str], ...] = ()  # (tenant name, key): keys of one name share a tenant
    metrics_key: str | None = None  # required on /metrics when set
    ready_key: str | None = None  # required on /ready when set
    max_body_bytes: int = 8 * 1024 * 1024
    max_prompt_tokens: int = 131_072
    max_inflight_per_worker: int = 0  # 0: the worker's own max_num_seqs
    queue_bound: int = 256
    queue_timeout_s: float = 30.0
    header_timeout_s: float = 10.0  # a connection's time to send a request head (slowloris)
    prompt_cache_bytes: int = 64 << 20  # sessions' last prompts, and each tokenizer's segment cache
    retry_after_s: int = 1
    max_attempts: int = 3
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 120.0
    first_byte_timeout_s: float = 20.0  # a streamed answer's head: a hung worker is retried elsewhere
    failure_backoff_s: float = 5.0  # a worker that failed an attempt is left out of picks this long
    stale_after_s: float = 3.0
    gateway_id: str = "gateway"
    snapshot_interval_s: float = 30.0  # index snapshots for new replicas (taken by one replica in turn)
    router_config: RouterConfig = msgspec.field(default_factory=RouterConfig)  # the routing tunables
    strip_anthropic_billing: bool = True  # drop Claude Code's per-request line from system prompts
    responses_ttl_s: float = 3600.0  # how long /v1/responses keeps a response for previous_response_id


class Gateway:
    """Everything one gateway process holds; the aiohttp handlers are its methods."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.metrics = GatewayMetrics()
        self.router = Router(policy=config.policy, config=config.router_config)
        self.subjects = Subjects(config.namespace)
        self.admission = Admission(config.queue_bound, config.queue_timeout_s)
        hold_s = self.router.config.admission_max_hold_s + config.queue_timeout_s
        self.holds = SessionHold(self.router, hold_s)  # session_kv's admission by session
        # session_kv's room queue: a pick waits here while its worker has no KV room for it
        self.rooms = RoomHold(self.router, self.router.config.room_max_hold_s + config.queue_timeout_s)
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
        self._cool_until: dict[str, float] = {}  # worker -> end of its back-off after a failed attempt
        # request ids unique across replicas and restarts: a random prefix per process, then a count
        # (a uuid4 per request costs a system call, on every turn)
        self._request_id_prefix = uuid.uuid4().hex[:16]
        self._request_numbers = itertools.count(1)
        bucket = f"kvgate_{config.namespace.replace('-', '_')}_responses"
        self.responses = ResponseStore(bucket, ttl_s=config.responses_ttl_s)

    # --- lifecycle

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[self._errors])
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/v1/completions", self.completions)
        AnthropicApi(self, strip_billing=self.config.strip_anthropic_billing).register(app)
        ResponsesApi(self, self.responses).register(app)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/ready", self.ready)
        app.router.add_get("/metrics", self.metrics_endpoint)
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

    # --- plain endpoints

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def ready(self, request: web.Request) -> web.Response:
        """200 once this replica has workers and an index caught up with the stream.

        A replica that loses NATS afterwards stays ready, saying `"degraded": true`: it still routes on
        its last view (workers, index, its own in-flight picks), and a readiness probe that failed on
        a bus outage would take every replica out of rotation at once, turning a degraded gateway into
        a down one. Before its first view (no workers, or the index still catching up) it is not ready.
        """
        _require(request, self.config.ready_key)
        workers = len(self.bus.workers)
        connected = self.bus.connected
        index_ready = self.replication.index_ready
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
        _require(request, self.config.metrics_key)
        self.metrics.queued.set(self.admission.queued)
        for wid in self.bus.workers:
            self.metrics.inflight.labels(wid).set(self.admission.inflight(wid))
        self.metrics.sessions.set(len(self.router.sessions))
        return web.Response(body=self.metrics.render(), headers={"content-type": CONTENT_TYPE})

    async def models(self, request: web.Request) -> web.Response:
        self._authorize(request)
        lengths: dict[str, list[int]] = {}
        for state in self.bus.workers.values():
            lengths.setdefault(state.registration.model, []).append(state.registration.max_model_len)
        data = []
        for name in sorted(lengths):
            model: dict[str, object] = {"id": name, "object": "model", "created": 0, "owned_by": "kvgate"}
            if min(lengths[name]) > 0:  # what every worker of the model serves, when they all said
                model["max_model_len"] = min(lengths[name])
            data.append(model)
        return web.json_response({"object": "list", "data": data})

    # --- turns

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._turn(request, "chat", "/v1/chat/completions")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._turn(request, "completion", "/v1/completions")

    async def _turn(self, request: web.Request, kind: Kind, path: str) -> web.StreamResponse:
        started = time.monotonic()
        self._authorize(request)
        turn = parse_turn(await self.read_body(request), kind)
        return await self.serve_turn(request, turn, path, started=started)

    async def read_body(self, request: web.Request) -> bytes:
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge as exc:
            raise ApiError(413, f"request body exceeds {self.config.max_body_bytes} bytes") from exc

    async def serve_turn(
        self,
        request: web.Request,
        turn: Turn,
        path: str,
        *,
        started: float | None = None,
        explicit_session: str | None = None,
        relay: Relay = forward,
    ) -> web.StreamResponse:
        """Route and serve one chat or completion turn; `relay` writes the worker's answer to the
        client (the other APIs' endpoints pass their own, and their session id when they know it)."""
        started = time.monotonic() if started is None else started
        if not self.traces.enabled:
            return await self._serve_turn(request, turn, path, started, explicit_session, relay)
        with self.traces.turn(request.headers, turn.kind, turn.model, turn.max_tokens):
            return await self._serve_turn(request, turn, path, started, explicit_session, relay)

    async def _serve_turn(
        self,
        request: web.Request,
        turn: Turn,
        path: str,
        started: float,
        explicit_session: str | None,
        relay: Relay,
    ) -> web.StreamResponse:
        workers = self._workers_for(turn.model)
        registration = self.bus.workers[next(iter(workers))].registration
        tokens = await self._tokens(turn, registration)
        explicit = explicit_session or explicit_session_id(request.headers, turn.body)
        tenant = self.tenants.of(request.headers)
        if tenant is not None:  # kept apart: salted hashes (here and on the worker), namespaced sessions
            turn.cache_salt = turn.body["cache_salt"] = tenants.salt(tenant, turn.cache_salt)
            explicit = tenants.namespaced(tenant, explicit)
        hashes = self.prompts.hashes(tokens, registration.block_size, turn.cache_salt, explicit)
        session_id = self.router.resolve_session(explicit, hashes)
        if self.traces.enabled:
            session = session_id or ""
            self.traces.annotate({"gen_ai.conversation.id": session, "kvgate.session.id": session})
        tool_loop = request.headers.get(TOOL_CALL_HEADER, "").lower() == "pending"
        if not tool_loop and turn.messages:
            tool_loop = turn.messages[-1].get("role") == "tool"  # it carries a tool result
        route = RouteRequest(
            request_id="",
            model=turn.model,
            block_hashes=hashes,
            num_tokens=len(tokens),
            session_id=session_id,
            expected_output_tokens=turn.max_tokens,
            tool_call_pending=tool_loop,
            parent_session_id=parent_session_id(request.headers),
        )
        refused = True
        try:
            response = await self._attempts(
                request, turn, route, tokens, workers, path, registration.block_size, relay
            )
            refused = response.status >= 400
        finally:
            if refused:  # nothing is kept for a refused request (a 400 for length, say)
                self.prompts.forget(explicit, registration.block_size, turn.cache_salt)
        self.metrics.e2e.observe(time.monotonic() - started)
        return response

    def _workers_for(self, model: str) -> frozenset[str]:
        if not self.bus.workers:
            raise ApiError(503, "no workers are available", code="no_workers")
        workers = frozenset(w for w, s in self.bus.workers.items() if s.registration.model == model)
        if not workers:
            raise ApiError(404, f"the model '{model}' does not exist", param="model", code="model_not_found")
        return workers

    def _tokenizer(self, spec: str) -> Tokenizer:
        tokenizer = self.tokenizers.get(spec)
        if tokenizer is None:
            raise TokenizerUnavailable(f"tokenizer {spec} is not loaded")
        return tokenizer

    async def tokenizer(self, spec: str) -> Tokenizer:
        """The tokenizer a registration names, fetched once per hash; 503 while it cannot be had."""
        tokenizer = self.tokenizers.get(spec)
        if tokenizer is not None:
            return tokenizer
        try:
            return await self.tokenizers.load(spec)
        except TokenizerUnavailable as exc:
            raise ApiError(503, str(exc), code="tokenizer_unavailable") from exc

    async def _tokens(self, turn: Turn, registration: WorkerRegistration) -> list[int]:
        await self.tokenizer(registration.tokenizer)
        try:
            tokens = self.prompts.tokens(turn, registration.tokenizer)
        except TemplateError as exc:
            raise ApiError(400, str(exc), param="messages") from exc
        if not tokens:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if len(tokens) > self.config.max_prompt_tokens:
            raise ApiError(
                400,
                f"the prompt has {len(tokens)} tokens, over the limit of {self.config.max_prompt_tokens}",
                code="context_length_exceeded",
            )
        context, output = registration.max_model_len, turn.requested_max_tokens
        if context and len(tokens) >= context:
            raise ApiError(  # the worker would refuse it: refused here, it costs the worker nothing
                400,
                f"the prompt has {len(tokens)} tokens; this model's context holds at most {context - 1}",
                param="messages" if turn.kind == "chat" else "prompt",
                code="context_length_exceeded",
            )
        if context and output is not None and len(tokens) + output > context:
            raise ApiError(  # as vLLM answers: an output that cannot fit would hold a slot for nothing
                400,
                f"This model's maximum context length is {context} tokens. However, you requested "
                f"{len(tokens) + output} tokens ({len(tokens)} in the prompt, {output} in the completion).",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return tokens

    async def _attempts(
        self,
        request: web.Request,
        turn: Turn,
        route: RouteRequest,
        tokens: list[int],
        workers: frozenset[str],
        path: str,
        block_size: int,
        relay: Relay,
    ) -> web.StreamResponse:
        base_id = f"req-{self._request_id_prefix}{next(self._request_numbers):x}"
        failed: set[str] = set()
        last_error = ""
        for attempt in range(self.config.max_attempts):
            eligible = frozenset(w for w in workers if w in self.bus.workers) - failed
            cooling = self._cooling(eligible)
            if cooling and cooling != eligible:  # one that just failed is left out while others can serve
                eligible -= cooling
            route.request_id = f"{base_id}-{attempt}"
            with self.traces.child("kvgate.admission"):
                decision = await self._admit(route, eligible, last_error)
            self.replication.replicas.picked(route, decision)
            try:
                response, _ = await self._send(
                    request, turn, route, tokens, decision, path, block_size, relay
                )
            except Retryable as exc:
                last_error = f"worker {decision.worker_id}: {exc}"
                log.warning("retrying %s elsewhere: %s", base_id, last_error)
                self.metrics.retries.inc()
                failed.add(decision.worker_id)
                self._cool_until[decision.worker_id] = time.monotonic() + self.config.failure_backoff_s
                continue
            self.metrics.count_request(request.path, response.status)  # the client's endpoint
            return response
        raise ApiError(502, f"no worker could serve the request ({last_error})", code="upstream_failed")

    def _cooling(self, workers: frozenset[str]) -> frozenset[str]:
        """Workers that failed a request (refused, 5xx, no first byte) within the back-off."""
        if not self._cool_until:
            return frozenset()
        now = time.monotonic()
        for wid in [w for w, until in self._cool_until.items() if until <= now or w not in self.bus.workers]:
            del self._cool_until[wid]
        return workers & self._cool_until.keys()

    async def _admit(self, route: RouteRequest, eligible: frozenset[str], last_error: str) -> Decision:
        def pick(exclude: frozenset[str]) -> Decision | None:
            try:
                return self.router.pick(route, time.monotonic(), exclude=exclude | self._ineligible(eligible))
            except (LookupError, ValueError, RuntimeError):
                return None  # the router has no candidate left

        try:
            await self.holds.enter(route)
            try:
                return await self.admission.admit(
                    pick, eligible, route.session_id or "", route.tool_call_pending
                )
            except BaseException:
                self.holds.leave(route)  # not picked after all: its session's place goes back
                raise
        except NoWorker as exc:
            if last_error:
                raise ApiError(
                    502, f"no worker could serve the request ({last_error})", code="upstream_failed"
                ) from exc
            raise ApiError(503, "no workers are available", code="no_workers") from exc
        except (QueueFull, TimeoutError) as exc:
            self.metrics.rejected.inc()
            raise ApiError(
                429,
                "every worker is saturated; retry later",
                code="overloaded",
                headers={"Retry-After": str(self.config.retry_after_s)},
            ) from exc

    def _ineligible(self, eligible: frozenset[str]) -> frozenset[str]:
        return frozenset(w for w in self.bus.workers if w not in eligible)

    async def _send(
        self,
        request: web.Request,
        turn: Turn,
        route: RouteRequest,
        tokens: list[int],
        decision: Decision,
        path: str,
        block_size: int,
        relay: Relay,
    ) -> tuple[web.StreamResponse, Outcome]:
        worker = decision.worker_id
        self.metrics.count_decision(self.config.policy, decision.reason)
        expected = min(decision.overlap_blocks * block_size, len(tokens))
        self.metrics.overlap_tokens.observe(expected)
        headers = {
            "x-kvgate-worker": worker,
            "x-kvgate-session": header_value(tenants.public(route.session_id or "")),
            "x-kvgate-cached-tokens-expected": str(expected),
            "x-kvgate-prompt-tokens": str(len(tokens)),
        }
        if self.traces.enabled:
            self.traces.annotate(self._route_attributes(route, decision, expected))
        body: dict[str, Any] = dict(turn.body)
        body["kvgate"] = {
            "prompt_token_ids": tokens,
            "request_id": route.request_id,
            "session_id": route.session_id,
        }
        if turn.stream:
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        outcome = Outcome()
        try:
            await self.rooms.enter(route, decision)
            state = self.bus.workers.get(worker)  # it may have left while the request waited for room
            sent_at = time.monotonic()
            if state is None:
                raise Retryable("worker left the pool")

            def first_token() -> None:
                now = time.monotonic()
                self.metrics.ttft.observe(now - sent_at)
                self.router.on_first_token(route.request_id, now)
                self.replication.replicas.first_token(route.request_id)

            with self.traces.child(f"POST {path}", SpanKind.CLIENT):  # its traceparent goes upstream
                response, outcome = await relay(
                    self.upstream,
                    state.registration.url.rstrip("/") + path,
                    msgspec.json.encode(body),
                    request=request,
                    stream=turn.stream,
                    client_wants_usage=turn.client_wants_usage,
                    headers=headers,
                    metrics=self.metrics,
                    on_first_token=first_token,
                )
            return response, outcome
        finally:
            self._finish(route, worker, outcome)

    def _route_attributes(self, route: RouteRequest, decision: Decision, expected: int) -> dict[str, Any]:
        return {
            "kvgate.route.worker": decision.worker_id,
            "kvgate.route.reason": decision.reason,
            "kvgate.route.expected_cached_tokens": expected,
            "kvgate.route.estimated_cost": decision.estimated_cost,
            "kvgate.route.request_id": route.request_id,
            "kvgate.route.tool_call_pending": route.tool_call_pending,
        }

    def _finish(self, route: RouteRequest, worker: str, outcome: Outcome) -> None:
        """Exactly once per attempt, whatever happened (success, failure, client gone)."""
        now = time.monotonic()
        if self.traces.enabled and outcome.ok:
            self.traces.annotate(
                {
                    "gen_ai.usage.input_tokens": outcome.prompt_tokens,
                    "gen_ai.usage.output_tokens": outcome.completion_tokens,
                    "gen_ai.response.finish_reasons": [outcome.finish_reason or ""],
                    "kvgate.cached_tokens": outcome.cached_tokens,
                }
            )
        self.admission.release(worker)
        if outcome.ok:
            self.bus.request_finished(worker)
            self.metrics.record_usage(
                outcome.prompt_tokens, outcome.cached_tokens, outcome.host_cached_tokens
            )
            served = max(0, outcome.prompt_tokens - outcome.cached_tokens) + outcome.completion_tokens
            self.admission.add_service(route.session_id or "", served)
        self.replication.replicas.done(
            route.request_id, outcome.finish_reason, outcome.completion_tokens, outcome.ok
        )
        hint = self.router.on_complete(
            route.request_id, now, outcome.finish_reason, outcome.completion_tokens, ok=outcome.ok
        )
        if hint is not None:
            self.bus.publish_pin(*hint)
        self.holds.poke()
        self.rooms.poke()

    # --- cross-cutting

    def _authorize(self, request: web.Request) -> None:
        if not self.config.api_keys:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header.lower().startswith("bearer ") else ""
        if not any(hmac.compare_digest(given.encode(), key.encode()) for key in self.config.api_keys):
            raise ApiError(401, "invalid or missing API key", code="invalid_api_key")

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        # every refusal is counted, under the route's path: a path the client made up is one label
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else "other"
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


def _require(request: web.Request, key: str | None) -> None:
    """401 unless the request bears `key` (when one is set)."""
    if key is None:
        return
    header = request.headers.get("authorization", "")
    given = header[7:].strip() if header.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(given.encode(), key.encode()):
        raise ApiError(401, "invalid or missing key", code="invalid_api_key")
