"""OpenAI request bodies to engine requests: validation, chat rendering, sampling options.

A gateway may send the prompt already tokenized in the body's `kvgate.prompt_token_ids`; otherwise
chat messages are rendered with `router.chat.encode_chat`, the same function the gateway hashes with.
`kvgate.output_token_ids` continues an answer: those tokens (the answer's output so far, which the
client has) follow the prompt, and the request generates the rest (a gateway sends a turn's decode
apart from its prompt so). `return_token_ids` is vLLM's request field, answered as vLLM does.
Options the engine cannot honour are refused with a `RequestError` (an OpenAI-style 400).
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import msgspec

from engines.runner import SamplingParams
from router.chat import ChatOptions, TemplateError, Tokenizer, encode_chat
from router.protocol import MAX_PRIORITY


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


class ParsedRequest(msgspec.Struct):
    prompt_token_ids: list[int]
    sampling: SamplingParams
    stop: list[str]
    stream: bool
    include_usage: bool
    request_id: str
    session_id: str | None
    cache_salt: str | None
    priority: int = 0  # vLLM's and SGLang's request field; read when the engine schedules by priority
    return_token_ids: bool = False  # vLLM's: the prompt's and the output's token ids in the answer
    output_token_ids: list[int] = []  # the answer's output so far (kvgate.output_token_ids): the
    # prompt's last tokens, whose text the client has; the request's text follows theirs


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


def token_ids_type(vocab_size: int) -> Any:
    """A list of token ids below `vocab_size`, for `msgspec.convert` (checked in C: a Python loop over
    a long prompt's ids took milliseconds of every request's TTFT)."""
    return list[Annotated[int, msgspec.Meta(ge=0, lt=vocab_size)]]


def _token_ids(value: Any, token_ids: Any, vocab_size: int, param: str) -> list[int]:
    """`value` as a non-empty list of ints of the type `token_ids_type(vocab_size)` (bools refused)."""
    if isinstance(value, list) and value:
        try:
            checked: list[int] = msgspec.convert(value, token_ids, strict=True)
            return checked
        except msgspec.ValidationError:
            pass
    raise RequestError(f"'{param}' must be a non-empty list of token ids below {vocab_size}", param)


class RequestParser:
    def __init__(
        self,
        tokenizer: Tokenizer,
        max_model_len: int,
        default_max_tokens: int = 512,
        max_stop_strings: int = 4,
    ) -> None:
        """`default_max_tokens`: for chat requests without max_tokens."""
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.default_max_tokens = default_max_tokens
        self.max_stop_strings = max_stop_strings
        self._token_ids = token_ids_type(tokenizer.vocab_size)

    def chat(self, body: dict[str, Any]) -> ParsedRequest:
        extension = self._extension(body)
        tokens = self._given_tokens(extension)
        if tokens is None:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise RequestError("'messages' must be a non-empty list", "messages")
            tools = body.get("tools")
            if tools is not None and not isinstance(tools, list):
                raise RequestError("'tools' must be a list", "tools")
            try:
                tokens = encode_chat(messages, self.tokenizer, tools, None, ChatOptions.from_body(body))
            except TemplateError as exc:
                raise RequestError(str(exc), "messages") from exc
        max_tokens = _int(body, "max_completion_tokens", 1) or _int(body, "max_tokens", 1)
        return self._common(body, extension, tokens, max_tokens or self.default_max_tokens)

    def completion(self, body: dict[str, Any]) -> ParsedRequest:
        extension = self._extension(body)
        tokens = self._given_tokens(extension)
        if tokens is None:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
                prompt = prompt[0]  # a batch of one
            if isinstance(prompt, str) and prompt:
                tokens = self.tokenizer.encode(prompt)
            elif isinstance(prompt, list):
                tokens = _token_ids(prompt, self._token_ids, self.tokenizer.vocab_size, "prompt")
            else:
                raise RequestError(
                    "'prompt' must be a non-empty string or list of token ids (one prompt)", "prompt"
                )
        max_tokens = _int(body, "max_tokens", 1) or 16  # the completions API's default
        return self._common(body, extension, tokens, max_tokens)

    def _extension(self, body: dict[str, Any]) -> dict[str, Any]:
        extension = body.get("kvgate") or {}
        if not isinstance(extension, dict):
            raise RequestError("'kvgate' must be an object", "kvgate")
        return extension

    def _given_tokens(self, extension: dict[str, Any]) -> list[int] | None:
        """The prompt a gateway tokenized already, checked against the vocabulary; None if it did not."""
        if "prompt_token_ids" not in extension:
            return None
        given = extension["prompt_token_ids"]
        return _token_ids(given, self._token_ids, self.tokenizer.vocab_size, "kvgate.prompt_token_ids")

    def _output_so_far(self, extension: dict[str, Any]) -> list[int]:
        """The answer's output so far that this request continues (`kvgate.output_token_ids`)."""
        if "output_token_ids" not in extension:
            return []
        given = extension["output_token_ids"]
        return _token_ids(given, self._token_ids, self.tokenizer.vocab_size, "kvgate.output_token_ids")

    def _common(
        self, body: dict[str, Any], extension: dict[str, Any], prompt: list[int], max_tokens: int
    ) -> ParsedRequest:
        _refuse_unsupported(body)
        output_so_far = self._output_so_far(extension)
        tokens = prompt + output_so_far if output_so_far else prompt
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise RequestError("'model' must be a string", "model")
        if len(tokens) >= self.max_model_len:
            raise RequestError(
                f"the prompt has {len(tokens)} tokens; this worker's context holds {self.max_model_len - 1}",
                "messages",
                code="context_length_exceeded",
            )
        stream, include_usage = _stream_settings(body)
        sampling = self._sampling(body, len(tokens), max_tokens, len(output_so_far))
        request_id, session_id, cache_salt = _request_ids(body, extension)
        priority = _priority(body)
        return_token_ids = body.get("return_token_ids")
        if return_token_ids is not None and not isinstance(return_token_ids, bool):
            raise RequestError("'return_token_ids' must be a boolean", "return_token_ids")
        return ParsedRequest(
            tokens,
            sampling,
            _stop_strings(body, self.max_stop_strings),
            stream,
            include_usage,
            request_id or uuid.uuid4().hex,
            session_id,
            cache_salt,
            priority,
            bool(return_token_ids),
            output_so_far,
        )

    def _sampling(
        self, body: dict[str, Any], prompt_tokens: int, max_tokens: int, output_offset: int
    ) -> SamplingParams:
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RequestError("'seed' must be an integer", "seed")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise RequestError("'ignore_eos' must be a boolean", "ignore_eos")
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p <= 0:
            raise RequestError("'top_p' must be above 0", "top_p")
        return SamplingParams(
            max_tokens=min(max_tokens, self.max_model_len - prompt_tokens),
            temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
            top_p=top_p,
            seed=seed,
            stop_token_ids=(self.tokenizer.eos_token_id,),
            ignore_eos=ignore_eos,
            output_offset=output_offset,
        )


def _stream_settings(body: dict[str, Any]) -> tuple[bool, bool]:
    """Whether to stream, and whether the stream ends with a usage chunk."""
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be a boolean", "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict)):
        raise RequestError(
            "'stream_options' is only allowed (as an object) when stream is true", "stream_options"
        )
    return stream, bool(options and options.get("include_usage"))


def _request_ids(
    body: dict[str, Any], extension: dict[str, Any]
) -> tuple[str | None, str | None, str | None]:
    """The gateway's request and session ids and the client's cache salt, each bounded: they key tables."""
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
    return request_id, session_id, cache_salt


def _priority(body: dict[str, Any]) -> int:
    priority = body.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > MAX_PRIORITY:
        raise RequestError(f"'priority' must be an integer of at most {MAX_PRIORITY} in size", "priority")
    return priority
