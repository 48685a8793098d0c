"""The worker's OpenAI-compatible HTTP surface over one engine.

`/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`, and `/metrics` (Prometheus: cached
tokens by tier). Streams exactly like OpenAI (text/event-stream, `data: {json}` events, a first delta
with the role, `data: [DONE]`, an optional usage chunk with `choices: []`). Request bodies are parsed
by `engines.openai_request`, the engine is driven by `engines.loop.EngineLoop`, and output tokens
become text in `engines.text_stream`. With vLLM's `return_token_ids`, an answer carries the ids as
vLLM's does: `prompt_token_ids` on the answer (a stream's first chunk) and `token_ids` on its choice
(a stream's chunks: the ids since the last chunk).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from aiohttp import web
from opentelemetry.trace import Tracer
from opentelemetry.util.types import AttributeValue

from engines.answer_chunks import AnswerChunks
from engines.engine import EngineRequest, RequestOutput
from engines.loop import KEEPALIVE, EngineLoop
from engines.openai_request import ParsedRequest, RequestError, RequestParser
from engines.text_stream import TextStream
from engines.tracing import RequestTimes, record_request
from engines.worker_metrics import CONTENT_TYPE, WorkerMetrics
from kvutil.body_budget import BodyBudget, BodyRefused
from router.chat import Tokenizer

log = logging.getLogger("kvgate.worker")

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive"}
KEEPALIVE_EVENT = b": keepalive\n\n"  # an SSE comment: clients skip it, a reader's timeout restarts
SERVED_BY_HEADER = "x-kvgate-served-by"  # the worker's id on every answer: who served it, behind any router


class WorkerSettings(msgspec.Struct, frozen=True):
    model_name: str
    worker_id: str = ""  # sent as SERVED_BY_HEADER when set
    max_body_bytes: int = 16 * 1024 * 1024
    body_budget_bytes: int = 512 * 1024 * 1024  # request bodies being read at once (kvutil/body_budget.py)
    body_timeout_s: float = 60.0  # a body's time to arrive once its head has
    max_requests: int = 4096  # in flight; beyond it new requests get a 503
    default_max_tokens: int = 512  # chat requests without max_tokens
    max_stop_strings: int = 4


def error_response(exc: RequestError) -> web.Response:
    body = {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
    return web.json_response(body, status=exc.status)


class Generation(msgspec.Struct):
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    host_cached_tokens: int = 0  # of which onboarded from the worker's host tier
    first_token_at: float | None = None  # event-loop time (traced requests' decode span)
    token_ids: list[int] | None = None  # the output's ids, kept when the request asks for them

    def usage(self) -> dict[str, Any]:
        details: dict[str, int] = {"cached_tokens": self.cached_tokens}
        if self.host_cached_tokens:  # a kvgate extension, only when a host tier served some
            details["host_cached_tokens"] = self.host_cached_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": details,
        }


class Answering:
    """One request on its way out: its parse, the engine's outputs for it, its text and its result."""

    __slots__ = ("chat", "parsed", "queue", "result", "stream")

    def __init__(
        self, parsed: ParsedRequest, queue: asyncio.Queue[RequestOutput], tokenizer: Tokenizer, chat: bool
    ) -> None:
        self.parsed = parsed
        self.queue = queue
        self.chat = chat
        self.stream = TextStream(tokenizer, parsed.stop)
        if parsed.output_token_ids:  # the text of the answer so far is the client's: this one follows it
            self.stream.add(parsed.output_token_ids)
            self.stream.take(final=True)
        self.result = Generation(prompt_tokens=len(parsed.prompt_token_ids))
        if parsed.return_token_ids:
            self.result.token_ids = []

    @property
    def kind(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def response_id(self) -> str:
        return ("chatcmpl-" if self.chat else "cmpl-") + self.parsed.request_id


class WorkerApp:
    def __init__(
        self, loop: EngineLoop, tokenizer: Tokenizer, settings: WorkerSettings, tracer: Tracer | None = None
    ) -> None:
        """`tracer`: spans per request (queue, prefill, decode) joining the caller's trace."""
        self.tracer = tracer
        self.loop = loop
        self.tokenizer = tokenizer
        self.settings = settings
        self.parser = RequestParser(
            tokenizer, loop.engine.max_model_len, settings.default_max_tokens, settings.max_stop_strings
        )
        self.ready = False
        self._served_by = {SERVED_BY_HEADER: settings.worker_id} if settings.worker_id else {}
        self.metrics = WorkerMetrics(
            lambda: loop.engine.prefetched_blocks, lambda: loop.engine.scheduler.num_preemptions
        )
        self.created = int(time.time())
        self.bodies = BodyBudget(settings.body_budget_bytes, settings.max_body_bytes, settings.body_timeout_s)
        self.app = web.Application(client_max_size=settings.max_body_bytes)
        self.app.router.add_post("/v1/chat/completions", self.chat_completions)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/health", self.health)
        self.app.router.add_get("/metrics", self.render_metrics)

    async def health(self, _request: web.Request) -> web.Response:
        if not self.ready or not self.loop.running:
            return web.json_response({"status": "starting"}, status=503)
        return web.json_response({"status": "ok", "model": self.settings.model_name})

    async def render_metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def models(self, _request: web.Request) -> web.Response:
        model = {
            "id": self.settings.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "kvgate",
            "max_model_len": self.loop.engine.max_model_len,  # as vLLM reports it: prompt + output
        }
        return web.json_response({"object": "list", "data": [model]})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            parsed = await self._parse(request, chat)
        except RequestError as exc:
            return error_response(exc)
        engine_id = f"{parsed.request_id}-{uuid.uuid4().hex[:8]}"  # unique even if a client reuses ids
        try:
            queue = await self._submit(engine_id, parsed)
        except ValueError as exc:
            return error_response(RequestError(str(exc)))
        times = None
        if self.tracer is not None:
            times = RequestTimes(asyncio.get_running_loop().time())
            self.loop.watch(engine_id)
        answering = Answering(parsed, queue, self.tokenizer, chat)
        result = answering.result
        done = False
        try:
            if parsed.stream:
                response = await self._stream(request, answering)
            else:
                try:
                    response = await self._answer_whole(answering)
                except RequestError as exc:
                    return error_response(exc)
            done = True
            if result.finish_reason is not None:  # answered in full (not a client that left)
                self.metrics.record(
                    result.prompt_tokens,
                    result.cached_tokens,
                    result.host_cached_tokens,
                    continuation=bool(parsed.output_token_ids),
                )
            return response
        finally:
            if not done or result.finish_reason is None or answering.stream.stopped:
                # client gone, or a stop string ended it early: free the sequence now
                await self.loop.abort(engine_id)
            if times is not None:
                self._trace(request, chat, engine_id, times, result)

    async def _parse(self, request: web.Request, chat: bool) -> ParsedRequest:
        body = await self._body(request)
        parsed = self.parser.chat(body) if chat else self.parser.completion(body)
        if self.loop.num_requests >= self.settings.max_requests:
            raise RequestError(
                "the worker is at its request limit; retry later", status=503, code="overloaded"
            )
        return parsed

    async def _submit(self, engine_id: str, parsed: ParsedRequest) -> asyncio.Queue[RequestOutput]:
        """The request into the engine: its outputs' queue. ValueError when the engine refuses it."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "request %s: %d prompt tokens (%d of them output so far), max_tokens %d, priority %d",
                engine_id,
                len(parsed.prompt_token_ids),
                len(parsed.output_token_ids),
                parsed.sampling.max_tokens,
                parsed.priority,
            )
        engine_request = EngineRequest(
            engine_id,
            parsed.prompt_token_ids,
            parsed.sampling,
            parsed.session_id,
            parsed.cache_salt,
            priority=parsed.priority,
        )
        return await self.loop.submit(engine_request)

    async def _answer_whole(self, answering: Answering) -> web.Response:
        """The answer in one body once the sequence is over; RequestError if the engine failed it."""
        result, parsed = answering.result, answering.parsed
        async for _ in self._outputs(answering):
            pass
        result.text = answering.stream.take(final=True)
        whole = self._whole(answering)
        if parsed.return_token_ids:  # as vLLM answers `return_token_ids`
            whole["prompt_token_ids"] = parsed.prompt_token_ids
            whole["choices"][0]["token_ids"] = result.token_ids
        return web.json_response(whole, headers=self._served_by)

    def _trace(
        self, request: web.Request, chat: bool, engine_id: str, times: RequestTimes, result: Generation
    ) -> None:
        assert self.tracer is not None
        now = asyncio.get_running_loop().time()
        times.first_step = self.loop.first_step(engine_id)
        times.first_token = result.first_token_at
        times.finished = now
        operation = "chat" if chat else "text_completion"
        attributes: dict[str, AttributeValue] = {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": self.settings.model_name,
            "gen_ai.usage.input_tokens": result.prompt_tokens,
            "gen_ai.usage.output_tokens": result.completion_tokens,
            "gen_ai.response.finish_reasons": [result.finish_reason or "abort"],
            "kvgate.cached_tokens": result.cached_tokens,
            "kvgate.request_id": engine_id,
        }
        name = f"{operation} {self.settings.model_name}"
        record_request(self.tracer, request.headers, name, times, now, attributes)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            raw = await self.bodies.read(request)
        except BodyRefused as exc:
            raise RequestError(exc.message, status=exc.status, code="body_refused") from exc
        except web.HTTPRequestEntityTooLarge as exc:
            raise RequestError(
                f"the request body exceeds {self.settings.max_body_bytes} bytes", status=413
            ) from exc
        try:
            # msgspec, not json: a long prompt's body (its token ids included) decodes ~4x faster, and
            # the decode is on every request's way to its first token
            body = msgspec.json.decode(raw)
        except msgspec.DecodeError as exc:
            raise RequestError(f"the body is not valid JSON: {exc}") from exc
        except RecursionError as exc:
            raise RequestError("the body nests too deeply") from exc
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        return body

    async def _outputs(self, answering: Answering) -> AsyncIterator[bool]:
        """Consume engine outputs until the sequence finishes or a stop string ends it: True after each
        output, False for the engine loop's `KEEPALIVE` (still held, nothing new)."""
        queue, stream, result = answering.queue, answering.stream, answering.result
        while result.finish_reason is None:
            out = await queue.get()
            if out is KEEPALIVE:
                yield False
                continue
            if result.first_token_at is None and out.new_token_ids:
                result.first_token_at = asyncio.get_running_loop().time()
            stream.add(out.new_token_ids)
            if result.token_ids is not None:
                result.token_ids += out.new_token_ids
            result.completion_tokens = out.completion_tokens
            result.cached_tokens = out.num_cached_tokens
            result.host_cached_tokens = out.num_host_cached_tokens
            if stream.stopped:
                result.finish_reason = "stop"
            elif out.finish_reason == "abort":
                raise RequestError("the engine failed while serving this request", status=500)
            elif out.finished:
                result.finish_reason = out.finish_reason
            yield True

    def _whole(self, answering: Answering) -> dict[str, Any]:
        result = answering.result
        if answering.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": result.text, "refusal": None},
                "logprobs": None,
                "finish_reason": result.finish_reason,
            }
        else:
            choice = {
                "index": 0,
                "text": result.text,
                "logprobs": None,
                "finish_reason": result.finish_reason,
            }
        return {
            "id": answering.response_id,
            "object": answering.kind,
            "created": int(time.time()),
            "model": self.settings.model_name,
            "choices": [choice],
            "usage": result.usage(),
            "system_fingerprint": None,
        }

    async def _stream(self, request: web.Request, answering: Answering) -> web.StreamResponse:
        stream, result, parsed = answering.stream, answering.result, answering.parsed
        response = web.StreamResponse(headers={**SSE_HEADERS, **self._served_by})
        await response.prepare(request)
        chunks = AnswerChunks(
            answering.response_id,
            answering.kind,
            answering.chat,
            self.settings.model_name,
            parsed.include_usage,
            result.token_ids,
            parsed.prompt_token_ids,
        )
        # the role chunk leaves with the first output, as vLLM sends it, not before: a router reads the
        # first event as the first token (its prefill is over), and the headers went at `prepare`
        head = chunks.role() if answering.chat else b""
        async for output in self._outputs(answering):
            if not output:  # minutes may pass without a token: a comment says the request is alive
                await response.write(KEEPALIVE_EVENT)
                continue
            text = stream.take(final=result.finish_reason is not None)
            if text:
                await response.write(head + chunks.text(text, None))
                head = b""
            elif head and result.finish_reason is None:
                await response.write(head)
                head = b""
        # the finish, the usage and [DONE] leave with the stream's end in one write (one system call
        # here, one read at the gateway)
        tail = head + chunks.text("", result.finish_reason)
        if parsed.include_usage:
            tail += chunks.usage(result.usage())
        await response.write_eof(tail + b"data: [DONE]\n\n")
        return response
