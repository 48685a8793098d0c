"""The worker's OpenAI-compatible HTTP surface over one engine.

`/v1/chat/completions`, `/v1/completions`, `/v1/models`, `/health`. Streams exactly like OpenAI
(text/event-stream, `data: {json}` events, a first delta with the role, `data: [DONE]`, an optional
usage chunk with `choices: []`). A gateway may send the prompt already tokenized in the body's
`kvgate.prompt_token_ids`; otherwise chat messages are rendered with `router.chat.encode_chat`, the
same function the gateway hashes with. Options the engine cannot honour are refused with a 400.

`EngineLoop` drives the synchronous engine from asyncio: one task steps it while handlers add, read
and abort requests. Every touch of the engine holds `lock`, so a torch step running in a thread never
meets a handler's `add_request` or a state dump halfway; mock steps sleep their modelled duration.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import msgspec
from aiohttp import web

from engines.engine import Engine, EngineRequest, RequestOutput, StepResult
from engines.runner import SamplingParams
from kvutil.tasks import cancel_and_wait
from router.chat import TemplateError, Tokenizer, encode_chat
from router.protocol import KvEvent

log = logging.getLogger("kvgate.worker")

T = TypeVar("T")

STOP_TIMEOUT_S = 2.0  # for the engine loop's task; a threaded step in flight still finishes after it

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive"}


class WorkerSettings(msgspec.Struct, frozen=True):
    model_name: str
    max_body_bytes: int = 16 * 1024 * 1024
    max_requests: int = 4096  # in flight; beyond it new requests get a 503
    default_max_tokens: int = 512  # chat requests without max_tokens
    max_stop_strings: int = 4


# --- the engine under asyncio


class EngineLoop:
    def __init__(self, engine: Engine, threaded: bool) -> None:
        """`threaded`: run steps in a thread (real compute), else inline, sleeping the modelled time."""
        self.engine = engine
        self.lock = asyncio.Lock()
        self.on_events: Callable[[list[KvEvent]], None] | None = None
        self.on_finished: Callable[[], None] | None = None
        self._events: list[KvEvent] = []
        engine.on_kv_events = self._events.extend
        self._queues: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="engine") if threaded else None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def num_requests(self) -> int:
        return len(self._queues)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="engine-loop")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait([self._task], STOP_TIMEOUT_S)
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def submit(self, request: EngineRequest) -> asyncio.Queue[RequestOutput]:
        """Queue a request; its outputs arrive on the returned queue. ValueError when refused."""
        queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        async with self.lock:
            self.engine.add_request(request)
            self._queues[request.request_id] = queue
        self._wake.set()
        return queue

    async def abort(self, request_id: str) -> None:
        async with self.lock:
            self._queues.pop(request_id, None)
            if self.engine.abort(request_id):
                self._wake.set()

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` between steps (pins, state dumps, load figures)."""
        async with self.lock:
            return fn()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        engine = self.engine
        while True:
            if not engine.has_work():
                self._wake.clear()
                await self._wake.wait()
            async with self.lock:
                try:
                    if self._executor is not None:
                        result = await loop.run_in_executor(self._executor, engine.step)
                    else:
                        result = engine.step()
                except Exception:
                    # a broken step must not leave clients hanging on their queues
                    log.exception("engine step failed; aborting the requests in flight")
                    self._fail_all()
                    await asyncio.sleep(0.1)
                    continue
                self._deliver(result)
            if self._executor is None and result.duration_s > 0:
                await asyncio.sleep(result.duration_s)
            else:
                await asyncio.sleep(0)

    def _deliver(self, result: StepResult) -> None:
        finished = False
        for out in result.outputs:
            queue = self._queues.get(out.request_id)
            if out.finished:
                finished = True
                self._queues.pop(out.request_id, None)
            if queue is not None:
                queue.put_nowait(out)
        if self._events:
            events = self._events[:]
            self._events.clear()
            if self.on_events is not None:
                self.on_events(events)
        if finished and self.on_finished is not None:
            self.on_finished()

    def _fail_all(self) -> None:
        for request_id, queue in list(self._queues.items()):
            self.engine.abort(request_id)
            queue.put_nowait(RequestOutput(request_id, [], True, "abort", 0, 0, 0))
        self._queues.clear()


# --- request parsing


class RequestError(Exception):
    """A request the worker refuses: rendered as an OpenAI error body."""

    def __init__(
        self, message: str, param: str | None = None, status: int = 400, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status = status
        self.code = code
        self.type = "invalid_request_error" if status < 500 else "server_error"


def error_response(exc: RequestError) -> web.Response:
    body = {"error": {"message": exc.message, "type": exc.type, "param": exc.param, "code": exc.code}}
    return web.json_response(body, status=exc.status)


class ParsedRequest(msgspec.Struct):
    prompt_token_ids: list[int]
    sampling: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool
    request_id: str
    session_id: str | None
    cache_salt: str | None


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise RequestError(f"'{name}' must be a number between {low} and {high}", name)
    return float(value)


def _int(body: dict[str, Any], name: str, low: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RequestError(f"'{name}' must be an integer >= {low}", name)
    return value


def _refuse_unsupported(body: dict[str, Any]) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise RequestError("only n=1 is supported", "n")
    best_of = body.get("best_of")
    if best_of is not None and best_of != 1:
        raise RequestError("only best_of=1 is supported", "best_of")
    for name in ("logprobs", "top_logprobs", "echo", "suffix", "logit_bias", "audio", "prediction"):
        if body.get(name):
            raise RequestError(f"'{name}' is not supported by this worker", name)
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name):
            raise RequestError(f"'{name}' is not supported by this worker (only 0)", name)
    response_format = body.get("response_format")
    if response_format is not None and (
        not isinstance(response_format, dict) or response_format.get("type", "text") != "text"
    ):
        raise RequestError("only response_format type 'text' is supported", "response_format")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise RequestError("only the text modality is supported", "modalities")
    tool_choice = body.get("tool_choice")
    if tool_choice is not None and tool_choice not in ("auto", "none"):
        raise RequestError("tool_choice must be 'auto' or 'none' (forced tool calls are not supported)")


def _stop_strings(body: dict[str, Any], limit: int) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > limit or not all(isinstance(s, str) and s for s in stops):
        raise RequestError(f"'stop' must be a non-empty string or a list of at most {limit} of them", "stop")
    return stops


def _token_ids(value: Any, vocab_size: int, param: str) -> list[int]:
    if (
        not isinstance(value, list)
        or not value
        or not all(type(t) is int and 0 <= t < vocab_size for t in value)
    ):
        raise RequestError(f"'{param}' must be a non-empty list of token ids below {vocab_size}", param)
    return value


class RequestParser:
    def __init__(self, tokenizer: Tokenizer, settings: WorkerSettings, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.settings = settings
        self.max_model_len = max_model_len

    def chat(self, body: dict[str, Any]) -> ParsedRequest:
        extension = self._extension(body)
        if "prompt_token_ids" in extension:
            tokens = _token_ids(
                extension["prompt_token_ids"], self.tokenizer.vocab_size, "kvgate.prompt_token_ids"
            )
        else:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise RequestError("'messages' must be a non-empty list", "messages")
            tools = body.get("tools")
            if tools is not None and not isinstance(tools, list):
                raise RequestError("'tools' must be a list", "tools")
            try:
                tokens = encode_chat(messages, self.tokenizer, tools)
            except TemplateError as exc:
                raise RequestError(str(exc), "messages") from exc
        max_tokens = _int(body, "max_completion_tokens", 1) or _int(body, "max_tokens", 1)
        return self._common(body, extension, tokens, max_tokens or self.settings.default_max_tokens)

    def completion(self, body: dict[str, Any]) -> ParsedRequest:
        extension = self._extension(body)
        if "prompt_token_ids" in extension:
            tokens = _token_ids(
                extension["prompt_token_ids"], self.tokenizer.vocab_size, "kvgate.prompt_token_ids"
            )
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
                prompt = prompt[0]  # a batch of one
            if isinstance(prompt, str) and prompt:
                tokens = self.tokenizer.encode(prompt)
            elif isinstance(prompt, list):
                tokens = _token_ids(prompt, self.tokenizer.vocab_size, "prompt")
            else:
                raise RequestError(
                    "'prompt' must be a non-empty string or list of token ids (one prompt)", "prompt"
                )
        max_tokens = _int(body, "max_tokens", 1) or 16  # the completions API's default
        return self._common(body, extension, tokens, max_tokens)

    def _pretokenized(self, extension: dict[str, Any]) -> list[int]:
        return _token_ids(extension["prompt_token_ids"], self.tokenizer.vocab_size, "kvgate.prompt_token_ids")

    def _extension(self, body: dict[str, Any]) -> dict[str, Any]:
        extension = body.get("kvgate") or {}
        if not isinstance(extension, dict):
            raise RequestError("'kvgate' must be an object", "kvgate")
        return extension

    def _common(
        self, body: dict[str, Any], extension: dict[str, Any], tokens: list[int], max_tokens: int
    ) -> ParsedRequest:
        _refuse_unsupported(body)
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise RequestError("'model' must be a string", "model")
        if len(tokens) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(tokens)} tokens; this worker's context holds {self.max_model_len - 1}",
                "messages",
                code="context_length_exceeded",
            )
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("'stream' must be a boolean", "stream")
        options = body.get("stream_options")
        if options is not None and (not stream or not isinstance(options, dict)):
            raise RequestError(
                "'stream_options' is only allowed (as an object) when stream is true", "stream_options"
            )
        include_usage = bool(options and options.get("include_usage"))
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RequestError("'seed' must be an integer", "seed")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise RequestError("'ignore_eos' must be a boolean", "ignore_eos")
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p <= 0:
            raise RequestError("'top_p' must be above 0", "top_p")
        sampling = SamplingParams(
            max_tokens=min(max_tokens, self.max_model_len - len(tokens)),
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=top_p,
            seed=seed,
            stop_token_ids=(self.tokenizer.eos_token_id,),
            ignore_eos=ignore_eos,
        )
        request_id = extension.get("request_id")
        session_id = extension.get("session_id")
        cache_salt = body.get("cache_salt")
        for name, value in (
            ("kvgate.request_id", request_id),
            ("kvgate.session_id", session_id),
            ("cache_salt", cache_salt),
        ):
            if value is not None and (not isinstance(value, str) or not 0 < len(value) <= 256):
                raise RequestError(f"'{name}' must be a string of 1 to 256 characters", name)
        return ParsedRequest(
            tokens,
            sampling,
            _stop_strings(body, self.settings.max_stop_strings),
            stream,
            include_usage,
            request_id or uuid.uuid4().hex,
            session_id,
            cache_salt,
        )


# --- detokenizing and stop strings


class TextStream:
    """Output tokens to text deltas: incremental detokenization, EOS dropped, stop strings applied
    on the decoded text (held back while they could still be forming)."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_ids: list[int]) -> None:
        eos = self.tokenizer.eos_token_id
        for token in token_ids:
            if token == eos or self.stopped:
                continue
            self._ids.append(token)
            decode = self.tokenizer.decode
            prefix = decode(self._ids[self._prefix_offset : self._read_offset])
            full = decode(self._ids[self._prefix_offset :])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                self._append(full[len(prefix) :])
                self._prefix_offset = self._read_offset
                self._read_offset = len(self._ids)

    def _append(self, delta: str) -> None:
        start = max(0, len(self.text) - self.hold)
        self.text += delta
        if not self.stop:
            return
        hits = [pos for pos in (self.text.find(s, start) for s in self.stop) if pos >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def take(self, final: bool) -> str:
        """The text not sent yet, keeping back what could be the start of a stop string."""
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self.hold)
        delta = self.text[self.sent : end]
        self.sent = end
        return delta


# --- the HTTP app


class Generation(msgspec.Struct):
    text: str = ""
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }


class WorkerApp:
    def __init__(self, loop: EngineLoop, tokenizer: Tokenizer, settings: WorkerSettings) -> None:
        self.loop = loop
        self.tokenizer = tokenizer
        self.settings = settings
        self.parser = RequestParser(tokenizer, settings, loop.engine.max_model_len)
        self.ready = False
        self.created = int(time.time())
        self.app = web.Application(client_max_size=settings.max_body_bytes)
        self.app.router.add_post("/v1/chat/completions", self.chat_completions)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/health", self.health)

    async def health(self, _request: web.Request) -> web.Response:
        if not self.ready or not self.loop.running:
            return web.json_response({"status": "starting"}, status=503)
        return web.json_response({"status": "ok", "model": self.settings.model_name})

    async def models(self, _request: web.Request) -> web.Response:
        model = {
            "id": self.settings.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "kvgate",
        }
        return web.json_response({"object": "list", "data": [model]})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            body = await self._body(request)
            parsed = self.parser.chat(body) if chat else self.parser.completion(body)
            if self.loop.num_requests >= self.settings.max_requests:
                raise RequestError(
                    "the worker is at its request limit; retry later", status=503, code="overloaded"
                )
        except RequestError as exc:
            return error_response(exc)
        engine_id = f"{parsed.request_id}-{uuid.uuid4().hex[:8]}"  # unique even if a client reuses ids
        engine_request = EngineRequest(
            engine_id, parsed.prompt_token_ids, parsed.sampling, parsed.session_id, parsed.cache_salt
        )
        try:
            queue = await self.loop.submit(engine_request)
        except ValueError as exc:
            return error_response(RequestError(str(exc)))
        kind = "chat.completion" if chat else "text_completion"
        response_id = ("chatcmpl-" if chat else "cmpl-") + parsed.request_id
        stream = TextStream(self.tokenizer, parsed.stop)
        result = Generation(prompt_tokens=len(parsed.prompt_token_ids))
        done = False
        try:
            if parsed.stream:
                response = await self._stream(request, queue, stream, result, parsed, chat, kind, response_id)
            else:
                try:
                    async for _ in self._outputs(queue, stream, result):
                        pass
                except RequestError as exc:
                    return error_response(exc)
                result.text = stream.take(final=True)
                response = web.json_response(self._whole(result, chat, kind, response_id))
            done = True
            return response
        finally:
            if not done or result.finish_reason is None or stream.stopped:
                # client gone, or a stop string ended it early: free the sequence now
                await self.loop.abort(engine_id)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json(loads=json.loads)
        except web.HTTPRequestEntityTooLarge as exc:
            raise RequestError(
                f"the request body exceeds {self.settings.max_body_bytes} bytes", status=413
            ) from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(f"the body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        return body

    async def _outputs(
        self, queue: asyncio.Queue[RequestOutput], stream: TextStream, result: Generation
    ) -> AsyncIterator[None]:
        """Consume engine outputs until the sequence finishes or a stop string ends it."""
        while result.finish_reason is None:
            out = await queue.get()
            stream.add(out.new_token_ids)
            result.completion_tokens = out.completion_tokens
            result.cached_tokens = out.num_cached_tokens
            if stream.stopped:
                result.finish_reason = "stop"
            elif out.finish_reason == "abort":
                raise RequestError("the engine failed while serving this request", status=500)
            elif out.finished:
                result.finish_reason = out.finish_reason
            yield

    def _whole(self, result: Generation, chat: bool, kind: str, response_id: str) -> dict[str, Any]:
        if chat:
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
            "id": response_id,
            "object": kind,
            "created": int(time.time()),
            "model": self.settings.model_name,
            "choices": [choice],
            "usage": result.usage(),
            "system_fingerprint": None,
        }

    async def _stream(
        self,
        request: web.Request,
        queue: asyncio.Queue[RequestOutput],
        stream: TextStream,
        result: Generation,
        parsed: ParsedRequest,
        chat: bool,
        kind: str,
        response_id: str,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers=SSE_HEADERS)
        await response.prepare(request)
        created = int(time.time())
        model = self.settings.model_name
        usage_field = {"usage": None} if parsed.include_usage else {}

        def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
            body = {
                "id": response_id,
                "object": f"{kind}.chunk" if chat else kind,
                "created": created,
                "model": model,
                "system_fingerprint": None,
                "choices": choices,
                **usage_field,
                **extra,
            }
            return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

        def choice(text: str, finish_reason: str | None, first: bool = False) -> dict[str, Any]:
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {}
            if text and not first:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

        if chat:
            await response.write(chunk([choice("", None, first=True)]))
        async for _ in self._outputs(queue, stream, result):
            text = stream.take(final=result.finish_reason is not None)
            if text:
                await response.write(chunk([choice(text, None)]))
        await response.write(chunk([choice("", result.finish_reason)]))
        if parsed.include_usage:
            await response.write(chunk([], usage=result.usage()))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
