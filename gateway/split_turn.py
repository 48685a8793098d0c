"""A turn sent as its prompt and then its decode, answered to the client as the one answer it asked for.

On a worker whose engine schedules by priority (SGLang's rule: a waiting request that does not fit
preempts running ones it outranks by more than a threshold), `session_kv` sends a turn as two requests
(`Router.decode_priority`, docs/TIERS.md): the prompt with `max_tokens` 1 at the client's priority (the
first token), then the rest of the output at a priority every prompt outranks, whose prompt is the
first one's plus that token (a prefix-cache hit). A prompt that does not fit then preempts decodes
instead of waiting for them to end. On a first-come-first-served worker with a host tier (`split_fcfs`) the
decode part goes at the default priority: it queues behind every prompt sent before it, so those get
device memory first, and finds its blocks on the host where they evicted them.

Joining the two answers needs the first token's id, which a plain OpenAI answer does not carry: the
first part asks for vLLM's `return_token_ids`, and the second continues the answer with kvgate's
`kvgate.output_token_ids` (the worker's text and sampling go on from the first token, so the joined
text is the one request's). Both are what a worker announces with `returns_token_ids`.

`SplitTurn` stands in for the upstream pool in one attempt: its `post` sends the first part and returns a
`JoinedAnswer`, which reads as the worker's one answer would: one stream (the first part's events as they
come, then the second's without its role delta), one `[DONE]`, one usage (the prompt's tokens and cached
tokens of the first part, the completion tokens of both), the finish reason of the second part (or of
the first, when it stopped at its one token); token ids the client did not ask for are removed. A
second part that fails ends the answer as a failed worker's does: an error event in a stream begun, an
`UpstreamError` before (the attempt is retried elsewhere, or answered 502).
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from gateway.stream_relay import MAX_EVENT_BYTES
from gateway.upstream import UpstreamError, UpstreamPool, UpstreamResponse, drain

_DONE = b"[DONE]"
# what a decode part's chunk may carry that the joined answer changes: the role (the answer began in the
# first part), the usage (joined), token ids (none were asked for: a worker's own, removed)
_EDITED_MEMBERS = re.compile(rb'"(?:role|usage|token_ids|prompt_token_ids)"\s*:\s*[^n\s]')
_DECODE_DATA = msgspec.json.Decoder()


def split_max_tokens(body: dict[str, Any]) -> int | None:
    """The output size to split a turn's answer by, or None when it cannot be joined from two parts
    exactly: the client sized it, at two tokens or more (a default is the worker's to choose; a size
    above the context is capped alike, whole or split), no stop strings (the first part's text would
    leave before the second could see one forming across the two), no token ids asked for (they would
    be the parts', not the turn's)."""
    if body.get("stop") or body.get("return_token_ids"):
        return None
    size = body.get("max_completion_tokens")
    if size is None:
        size = body.get("max_tokens")
    return size if type(size) is int and size >= 2 else None


class SplitTurn:
    """One attempt of a turn on one worker, sent as its prompt part and then its decode part."""

    def __init__(
        self, pool: UpstreamPool, body: dict[str, Any], max_tokens: int, decode_priority: int, stream: bool
    ) -> None:
        """`body`: the turn's body as it would go to the worker whole (with `kvgate.prompt_token_ids`);
        `max_tokens`: the client's, of which the decode part asks for the rest."""
        self.pool = pool
        self.first_byte_timeout_s = pool.first_byte_timeout_s
        self.body = body
        self.max_tokens = max_tokens
        self.decode_priority = decode_priority
        self.stream = stream

    def first_part(self) -> bytes:
        """The prompt part's body: one token, at the turn's own priority, with its token ids."""
        body = {k: v for k, v in self.body.items() if k != "max_completion_tokens"}
        body["max_tokens"] = 1
        body["return_token_ids"] = True
        return msgspec.json.encode(body)

    def decode_part(self, first_token_ids: list[int]) -> bytes:
        """The decode part's body: the answer continued after its first token, the rest of its output,
        at the priority every prompt outranks."""
        body = {k: v for k, v in self.body.items() if k != "max_completion_tokens"}
        body["max_tokens"] = self.max_tokens - len(first_token_ids)
        body["priority"] = self.decode_priority
        body["kvgate"] = {**self.body["kvgate"], "output_token_ids": first_token_ids}
        return msgspec.json.encode(body)

    async def post(
        self, url: str, payload: bytes, head_timeout_s: float | None = None
    ) -> UpstreamResponse | JoinedAnswer:
        """Send the prompt part (`payload`, from `first_part`); what the pool's `post` answers, or, on a
        200, the answer joined from both parts."""
        resp = await self.pool.post(url, payload, head_timeout_s)
        if resp.status != 200:
            return resp  # refused or failed: the relay answers it as the worker's
        return JoinedAnswer(self, url, resp)


class _FirstPart:
    """What the joined stream keeps of its first part until it is known whether the decode follows."""

    __slots__ = ("created", "finish", "token_ids", "usage")

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.finish: dict[str, Any] | None = None  # its finish chunk, its output (if any) sent already
        self.usage: dict[str, Any] | None = None  # its usage chunk
        self.created: Any = None


class JoinedAnswer:
    """The two parts' answers read as one `UpstreamResponse` (the members the relays use)."""

    def __init__(self, split: SplitTurn, url: str, first: UpstreamResponse) -> None:
        self.split = split
        self.url = url
        self.status = first.status
        self.headers = first.headers
        self._resp: UpstreamResponse | _DecodePart = first
        self._first: _FirstPart | None = _FirstPart()  # None once the decode part runs
        self._first_usage: Any = None  # the first part's usage, joined into the decode part's
        self._created: Any = None  # the first part's `created`, kept by the decode part's chunks
        self._created_member = b""  # its JSON member: a chunk that has it needs no edit for it
        self._buffer = b""
        self._done = False
        self._committed = False

    @property
    def complete(self) -> bool:
        return self._done

    def commit(self) -> None:
        self._committed = True
        self._resp.commit()

    def release(self) -> None:
        self._resp.release()

    def close(self) -> None:
        self._resp.close()

    # --- a whole answer

    async def read(self) -> bytes:
        answer = _object(await self._resp.read())
        choice = _first_choice(answer)
        ids = _pop_ids(answer, choice)
        self._done = True
        if not self._continues(choice.get("finish_reason"), ids):
            return msgspec.json.encode(answer)
        self._resp.release()
        self._resp = _DecodePart(self.split, self.url, ids)
        rest = _object(await self._resp.read())
        rest_choice = _first_choice(rest)
        _pop_ids(rest, rest_choice)
        if isinstance(rest_choice.get("message"), dict):  # chat: the message's content goes on
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else None
            rest_choice["message"]["content"] = (text or "") + (rest_choice["message"].get("content") or "")
        else:
            rest_choice["text"] = (choice.get("text") or "") + (rest_choice.get("text") or "")
        answer["choices"][0] = rest_choice
        answer["usage"] = _joined_usage(answer.get("usage"), rest.get("usage"))
        return msgspec.json.encode(answer)

    # --- a stream

    async def read_chunk(self) -> bytes:
        while not self._done:
            chunk = await self._resp.read_chunk()
            if not chunk:
                return b""  # the part ended without [DONE]: the relay says so
            self._buffer += chunk
            out: list[bytes] = []
            while not self._done:
                end = self._buffer.find(b"\n\n")
                if end < 0:
                    break
                event = self._buffer[: end + 2]
                self._buffer = self._buffer[end + 2 :]
                if self._first is not None:
                    edited = await self._first_event(self._first, event)
                else:
                    edited = self._rest_event(event)
                if edited:
                    out.append(edited)
            if len(self._buffer) > MAX_EVENT_BYTES:  # as the relay bounds its own
                raise UpstreamError(f"worker sent over {MAX_EVENT_BYTES} bytes without an event's end")
            if self._done:
                await drain(self._resp)  # its connection back to the pool
            if out:
                return b"".join(out)
        return b""

    async def _first_event(self, first: _FirstPart, event: bytes) -> bytes:
        """An event of the first part: relayed at once, but for its end, held until it is known
        whether the decode part follows."""
        data = _data(event)
        if data is None:
            return event
        if data == _DONE:
            finish = first.finish
            reason = _first_choice(finish).get("finish_reason") if finish is not None else None
            if not self._continues(reason, first.token_ids):  # the answer was its one token
                self._done = True
                ends = [finish, first.usage]
                return b"".join(_event(chunk) for chunk in ends if chunk is not None) + event
            await drain(self._resp)
            self._resp.release()
            self._resp = _DecodePart(self.split, self.url, first.token_ids)
            if self._committed:
                self._resp.commit()
            self._first = None
            self._first_usage = first.usage.get("usage") if first.usage is not None else None
            self._created = first.created
            if type(first.created) is int:  # as a kvgate worker writes it (compact JSON)
                self._created_member = b'"created":%d,' % first.created
            self._buffer = b""
            return b""
        chunk = _object(data)
        if first.created is None:
            first.created = chunk.get("created")
        if chunk.get("choices") == [] and chunk.get("usage"):
            first.usage = chunk  # joined with the decode part's, or sent as it is
            return b""
        choice = _first_choice(chunk)
        _pop_ids(chunk, choice, first.token_ids)
        if choice.get("finish_reason") is None:
            return _event(chunk)
        # its end: sent only if the answer ends here; its output (vLLM sends the last text with the
        # finish reason) leaves now
        output = _take_output(choice)
        first.finish = msgspec.json.decode(msgspec.json.encode(chunk))  # a copy, without the output
        if not output:
            return b""
        _put_output(choice, output)
        choice["finish_reason"] = None
        choice.pop("stop_reason", None)
        return _event(chunk)

    def _rest_event(self, event: bytes) -> bytes:
        """An event of the decode part, as the rest of the first part's answer."""
        if self._created_member and self._created_member in event and _EDITED_MEMBERS.search(event) is None:
            return event  # the usual token chunk (no ids were asked for it): relayed untouched
        data = _data(event)
        if data is None:
            return event
        if data == _DONE:
            self._done = True
            return event
        chunk = _object(data)
        if self._created is not None:
            chunk["created"] = self._created
        if chunk.get("choices") == [] and chunk.get("usage"):
            chunk["usage"] = _joined_usage(self._first_usage, chunk["usage"])
            return _event(chunk)
        choice = _first_choice(chunk)
        _pop_ids(chunk, choice)
        delta = choice.get("delta")
        if isinstance(delta, dict) and "role" in delta:  # the answer began in the first part
            del delta["role"]
            if not delta.get("content"):
                delta.pop("content", None)
            if not delta and choice.get("finish_reason") is None:
                return b""
        return _event(chunk)

    def _continues(self, finish_reason: Any, first_token_ids: list[int]) -> bool:
        """Whether the decode part follows: the first part stopped at its one token for its length."""
        return finish_reason == "length" and len(first_token_ids) == 1 and self.split.max_tokens > 1


class _DecodePart:
    """The decode part's response, posted on its first read: a refusal or failure there is a worker's
    failure mid-answer (UpstreamError)."""

    def __init__(self, split: SplitTurn, url: str, first_token_ids: list[int]) -> None:
        self.split = split
        self.url = url
        self.payload = split.decode_part(first_token_ids)
        self.resp: UpstreamResponse | None = None
        self.committed = False
        self.released = False

    @property
    def complete(self) -> bool:
        return self.resp is not None and self.resp.complete

    async def _open(self) -> UpstreamResponse:
        if self.resp is not None:
            return self.resp
        if self.released:
            raise UpstreamError("the answer was given up before its decode part")
        split = self.split
        timeout = split.pool.first_byte_timeout_s if split.stream else None
        resp = await split.pool.post(self.url, self.payload, timeout)
        if resp.status != 200:
            resp.release()
            raise UpstreamError(f"the worker answered {resp.status} to the turn's decode part")
        if self.committed:
            resp.commit()
        self.resp = resp
        return resp

    async def read(self) -> bytes:
        return await (await self._open()).read()

    async def read_chunk(self) -> bytes:
        return await (await self._open()).read_chunk()

    def commit(self) -> None:
        self.committed = True
        if self.resp is not None:
            self.resp.commit()

    def release(self) -> None:
        self.released = True
        if self.resp is not None:
            self.resp.release()

    def close(self) -> None:
        self.released = True
        if self.resp is not None:
            self.resp.close()


def _data(event: bytes) -> bytes | None:
    """The data of a `data:` event, None for any other line (a comment passes through)."""
    return event[5:].strip() if event.startswith(b"data:") else None


def _event(chunk: dict[str, Any]) -> bytes:
    return b"data: " + msgspec.json.encode(chunk) + b"\n\n"


def _object(data: bytes) -> dict[str, Any]:
    """A worker's JSON answer or chunk; anything else is a worker failing (UpstreamError)."""
    try:
        value = _DECODE_DATA.decode(data)
    except msgspec.DecodeError as exc:
        raise UpstreamError("the worker's answer is not JSON") from exc
    if not isinstance(value, dict):
        raise UpstreamError("the worker's answer is not a JSON object")
    return value


def _first_choice(answer: dict[str, Any]) -> dict[str, Any]:
    choices = answer.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise UpstreamError("the worker's answer has no choice")
    return choices[0]


def _pop_ids(answer: dict[str, Any], choice: dict[str, Any], into: list[int] | None = None) -> list[int]:
    """Remove the token ids the gateway asked for (the client did not); the choice's, checked."""
    answer.pop("prompt_token_ids", None)
    ids = choice.pop("token_ids", None)
    if ids is None:
        ids = []
    if not isinstance(ids, list) or not all(type(i) is int and i >= 0 for i in ids):
        raise UpstreamError("the worker's token_ids are not token ids")
    if into is not None:
        into += ids
        return into
    return ids


def _take_output(choice: dict[str, Any]) -> str:
    """Remove a chunk's text (a chat delta's content, or a completion's text) and return it."""
    delta = choice.get("delta")
    if isinstance(delta, dict):
        text = delta.pop("content", None)
        return text if isinstance(text, str) else ""
    text = choice.get("text")
    choice["text"] = ""
    return text if isinstance(text, str) else ""


def _put_output(choice: dict[str, Any], text: str) -> None:
    delta = choice.get("delta")
    if isinstance(delta, dict):
        delta["content"] = text
    else:
        choice["text"] = text


def _count(usage: Any, name: str) -> int:
    value = usage.get(name) if isinstance(usage, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _joined_usage(first: Any, rest: Any) -> dict[str, Any]:
    """The turn's usage: its prompt and cached tokens from the first part (the second's prompt is the
    first's plus a token), the completion tokens of both."""
    usage = dict(rest) if isinstance(rest, dict) else {}
    if isinstance(first, dict):
        prompt = _count(first, "prompt_tokens")
    else:  # none came (a worker that sends none): the decode part's prompt less the first token
        prompt = max(0, _count(rest, "prompt_tokens") - 1)
    completion = _count(first, "completion_tokens") + _count(rest, "completion_tokens")
    usage["prompt_tokens"] = prompt
    usage["completion_tokens"] = completion
    usage["total_tokens"] = prompt + completion
    if isinstance(first, dict) and "prompt_tokens_details" in first:
        usage["prompt_tokens_details"] = first["prompt_tokens_details"]
    return usage
