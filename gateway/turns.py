"""A turn's path through the gateway, from the request's body to the relayed answer.

A turn: validate, resolve the model's workers, tokenize and hash as they do, resolve the session,
admit (per-worker limits, bounded queue), pick, forward with the token ids, relay, then tell the
router how it went (and send the pin hint it returns).
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
from aiohttp import web
from opentelemetry.trace import SpanKind

from gateway import tenants
from gateway.admission import NoWorker, QueueFull
from gateway.api_bridge import EXPECTED_CACHED_HEADER, PROMPT_TOKENS_HEADER, Relay
from gateway.errors import ApiError
from gateway.proxy import Outcome, Retryable, forward
from gateway.session_id import explicit_session_id, header_value, parent_session_id
from gateway.slice_cuts import SliceCuts
from gateway.split_turn import SplitTurn, split_max_tokens
from gateway.tokenizers import TokenizerUnavailable
from gateway.upstream import Upstream
from gateway.validation import Turn
from kvutil.body_budget import BodyBudget, BodyRefused
from router.chat import TemplateError, Tokenizer
from router.protocol import WorkerRegistration
from router.request import Decision, RouteRequest

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("kvgate.gateway")

TOOL_CALL_HEADER = "x-kvgate-tool-call"


class Turns:
    """Serves turns for every API family, over the parts a `Gateway` holds."""

    def __init__(self, gateway: Gateway) -> None:
        self.config = gateway.config
        self.metrics = gateway.metrics
        self.router = gateway.router
        self.bus = gateway.bus
        self.replication = gateway.replication
        self.admission = gateway.admission
        self.holds = gateway.holds
        self.rooms = gateway.rooms
        self.tokenizers = gateway.tokenizers
        self.tenants = gateway.tenants
        self.prompts = gateway.prompts
        self.traces = gateway.traces
        self.upstream = gateway.upstream
        self.bodies = BodyBudget(
            self.config.body_budget_bytes, self.config.max_body_bytes, self.config.body_timeout_s
        )
        self._cool_until: dict[str, float] = {}  # worker -> end of its back-off after a failed attempt
        # request ids unique across replicas and restarts: a random prefix per process, then a count
        # (a uuid4 per request costs a system call, on every turn)
        self._request_id_prefix = uuid.uuid4().hex[:16]
        self._request_numbers = itertools.count(1)
        # a turn may go as its prompt and then its decode (gateway/split_turn.py): only where the router
        # sends decodes apart at all, so that every other turn pays one attribute read for it
        self._splits_turns = self.config.split_turns and self.router.yields_decodes
        # streamed answers' decode slices, which a prompt that does not fit on their worker may cut
        self.slice_cuts = SliceCuts(self.router)

    async def read_body(self, request: web.Request) -> bytes:
        try:
            return await self.bodies.read(request)
        except BodyRefused as exc:
            headers = {"Retry-After": str(self.config.retry_after_s)} if exc.status == 503 else None
            raise ApiError(exc.status, exc.message, code="body_refused", headers=headers) from exc
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
        workers = self.workers_for(turn.model)
        registration = self.bus.workers[next(iter(workers))].registration
        tokens = await self._tokens(turn, registration)
        explicit = explicit_session or explicit_session_id(request.headers, turn.body)
        parent = parent_session_id(request.headers)
        tenant = self.tenants.of(request.headers)
        if tenant is not None:  # kept apart: salted hashes (here and on the worker), namespaced sessions
            turn.cache_salt = turn.body["cache_salt"] = tenants.salt(tenant, turn.cache_salt)
            explicit = tenants.namespaced(tenant, explicit)
            parent = tenants.namespaced(tenant, parent)  # a parent is one of the tenant's own sessions
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
            parent_session_id=parent,
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

    def workers_for(self, model: str) -> frozenset[str]:
        if not self.bus.workers:
            raise ApiError(503, "no workers are available", code="no_workers")
        workers = frozenset(w for w, s in self.bus.workers.items() if s.registration.model == model)
        if not workers:
            raise ApiError(404, f"the model '{model}' does not exist", param="model", code="model_not_found")
        return workers

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
            EXPECTED_CACHED_HEADER: str(expected),
            PROMPT_TOKENS_HEADER: str(len(tokens)),
        }
        if self.traces.enabled:
            self.traces.annotate(self._route_attributes(route, decision, expected))
        body = _worker_body(turn, tokens, route)
        outcome = Outcome()
        try:
            await self.rooms.enter(route, decision)
            state = self.bus.workers.get(worker)  # it may have left while the request waited for room
            sent_at = time.monotonic()
            if state is None:
                raise Retryable("worker left the pool")
            first_token = self._first_token_callback(route.request_id, sent_at)
            pool, payload = self._pool_and_payload(turn, body, worker, route)
            with self.traces.child(f"POST {path}", SpanKind.CLIENT):  # its traceparent goes upstream
                response, outcome = await relay(
                    pool,
                    state.registration.url.rstrip("/") + path,
                    payload,
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

    def _first_token_callback(self, request_id: str, sent_at: float) -> Callable[[], None]:
        def first_token() -> None:
            now = time.monotonic()
            self.metrics.ttft.observe(now - sent_at)
            self.router.on_first_token(request_id, now)
            self.replication.replicas.first_token(request_id)
            self.rooms.changed()  # a prefill ended on that worker: what waits for it may fit now
            self.holds.poke()  # and the router's overload queue may let a turn go

        return first_token

    def _pool_and_payload(
        self, turn: Turn, body: dict[str, Any], worker: str, route: RouteRequest
    ) -> tuple[Upstream, bytes]:
        """What the relay posts through, and its body: the whole turn, or where the turn is split its
        prompt part (the split stands in for the pool: its `post` sends the parts, answering them as one)."""
        split = self._split(turn, body, worker, route) if self._splits_turns else None
        if split is None:
            return self.upstream, msgspec.json.encode(body)
        return split, split.first_part()

    def _split(self, turn: Turn, body: dict[str, Any], worker: str, route: RouteRequest) -> SplitTurn | None:
        """The turn as its prompt and then its decode (in slices where the router says so), where the
        router sends decodes apart on this worker (session_kv; priority scheduling, or a host tier; token
        ids) and the answer can be joined exactly."""
        priority = self.router.decode_priority(worker)
        max_tokens = split_max_tokens(body) if priority is not None else None
        if priority is None or max_tokens is None:
            return None
        self.metrics.split_turns.inc()
        slice_tokens = self.router.decode_slice_tokens(worker)
        owner = (route.request_id, worker, len(route.block_hashes))
        chain = route.block_hashes
        pieces = self.router.prefill_pieces(worker, chain, len(body["kvgate"]["prompt_token_ids"]))
        if pieces:
            self.metrics.prefill_pieces.inc(len(pieces))
        before_prompt = self._slice_cutter(worker, chain) if slice_tokens else None
        return SplitTurn(
            self.upstream,
            body,
            max_tokens,
            priority,
            turn.stream,
            slice_tokens,
            self.slice_cuts,
            owner,
            pieces,
            before_prompt,
        )

    def _slice_cutter(self, worker: str, chain: list[int]) -> Callable[[int], None]:
        """What a split turn calls as each of its prefill pieces and its prompt part is sent to `worker`
        (a prompt of `tokens` tokens): the slices there that the router names for it are cut."""
        block_size = self.router.block_size

        def cut_for(tokens: int) -> None:
            cut = self.slice_cuts.cut_for(worker, chain[: tokens // block_size], time.monotonic())
            if cut:
                self.metrics.slices_cut.inc(cut)

        return cut_for

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


def _worker_body(turn: Turn, tokens: list[int], route: RouteRequest) -> dict[str, Any]:
    """The client's body for the worker: with the prompt as tokenized here and the route's ids, and
    on a stream with usage asked for (the gateway counts the tokens served from it)."""
    body: dict[str, Any] = dict(turn.body)
    body["kvgate"] = {
        "prompt_token_ids": tokens,
        "request_id": route.request_id,
        "session_id": route.session_id,
    }
    if turn.stream:
        options = body.get("stream_options")
        body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return body
