"""A turn sent as its prompt and then its decode, answered to the client as the one answer it asked for.

On a worker whose engine schedules by priority (SGLang's rule: a waiting request that does not fit
preempts running ones it outranks by more than a threshold), `session_kv` sends a turn as two requests
(`Router.decode_priority`, docs/TIERS.md): the prompt with `max_tokens` 1 at the client's priority (the
first token), then the rest of the output at a priority every prompt outranks, whose prompt is the
first one's plus that token (a prefix-cache hit). A prompt that does not fit then preempts decodes
instead of waiting for them to end. On a first-come-first-served worker with a host tier (`split_fcfs`) the
decode part goes at the default priority: it queues behind every prompt sent before it, so those get
device memory first, and finds its blocks on the host where they evicted them. There the decode can go
in slices (`Router.decode_slice_tokens`): parts of at most that many tokens, each sent when the one
before it ends, the prompt plus the output so far, so that each queues behind the prompts sent
meanwhile: a preemption the gateway makes every slice. A prompt that does not fit beside a streamed
answer's running slice may also cut it (gateway/slice_cuts.py): `JoinedAnswer.cut` closes the slice's
stream and goes on with the next slice from the output relayed so far. There a long prompt may also go
in prefill pieces first (`Router.prefill_pieces`): requests for its first tokens, more each time, with
`max_tokens` 1 and their answers dropped, each sent when the one before ends, so that the prompts sent
meanwhile queue in front of the next piece instead of waiting for the whole prefill; the prompt part
then finds all but its last piece cached. The turn's usage reports what was cached before the first
piece.

Joining the answers needs the output's token ids, which a plain OpenAI answer does not carry: every
part that another may follow asks for vLLM's `return_token_ids`, and the next continues the answer with
kvgate's `kvgate.output_token_ids` (the worker's text and sampling go on from the output so far, so the
joined text is the one request's). Both are what a worker announces with `returns_token_ids`.

`SplitTurn` stands in for the upstream pool in one attempt: its `post` sends the first part and returns a
`JoinedAnswer`, which reads as the worker's one answer would: one stream (the first part's events as they
come, then the others' without their role delta), one `[DONE]`, one usage (the prompt's tokens and cached
tokens of the first part, the completion tokens of all), the finish reason of the last part (a part
that stops short of its size, or the last one the output needs); token ids the client did not ask for
are removed. A part after the first that fails ends the answer as a failed worker's does: an error event
in a stream begun, an `UpstreamError` before (the attempt is retried elsewhere, or answered 502).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from gateway.slice_cuts import SliceCuts
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
    """One attempt of a turn on one worker, sent as its prompt part and then its decode, in one part or
    in slices."""

    def __init__(
        self,
        pool: UpstreamPool,
        body: dict[str, Any],
        max_tokens: int,
        decode_priority: int,
        stream: bool,
        slice_tokens: int = 0,
        cuts: SliceCuts | None = None,
        slice_owner: tuple[str, str, int] = ("", "", 0),
        pieces: Sequence[int] = (),
        before_prompt: Callable[[int], None] | None = None,
    ) -> None:
        """`body`: the turn's body as it would go to the worker whole (with `kvgate.prompt_token_ids`);
        `max_tokens`: the client's, of which the decode parts ask for the rest; `slice_tokens`: the most
        one decode part asks for (0: the whole rest); `cuts`: where a streamed answer's slices are
        registered so that a prompt that does not fit may cut them (gateway/slice_cuts.py), with
        `slice_owner` (the turn's request id, its worker, its prompt blocks); `pieces`: the prompt
        lengths of the prefill pieces sent before the prompt part; `before_prompt(tokens)`: called as
        each piece and the prompt part is about to be sent, with its prompt's length (the slices it
        may cut)."""
        self.pool = pool
        self.first_byte_timeout_s = pool.first_byte_timeout_s
        self.body = body
        self.max_tokens = max_tokens
        self.decode_priority = decode_priority
        self.stream = stream
        self.slice_tokens = slice_tokens
        self.cuts = cuts if stream and slice_tokens > 0 else None
        self.slice_owner = slice_owner
        self.pieces = list(pieces)
        self.before_prompt = before_prompt
        self.prompt_details: Any = None  # the first piece's `prompt_tokens_details`: cached before it

    def first_part(self) -> bytes:
        """The prompt part's body: one token, at the turn's own priority, with its token ids."""
        body = {k: v for k, v in self.body.items() if k != "max_completion_tokens"}
        body["max_tokens"] = 1
        body["return_token_ids"] = True
        return msgspec.json.encode(body)

    def part_size(self, produced: int) -> int:
        """The output tokens the decode part after `produced` of them asks for."""
        rest = self.max_tokens - produced
        return min(rest, self.slice_tokens) if self.slice_tokens > 0 else rest

    def decode_part(self, output_token_ids: list[int]) -> bytes:
        """A decode part's body: the answer continued after its output so far, the next slice of it (or
        all the rest), at the decode priority; with its token ids where another part may follow."""
        body = {k: v for k, v in self.body.items() if k != "max_completion_tokens"}
        size = self.part_size(len(output_token_ids))
        body["max_tokens"] = size
        body["priority"] = self.decode_priority
        if len(output_token_ids) + size < self.max_tokens:
            body["return_token_ids"] = True
        body["kvgate"] = {**self.body["kvgate"], "output_token_ids": output_token_ids}
        return msgspec.json.encode(body)

    def piece(self, length: int) -> bytes:
        """A prefill piece's body: the prompt's first `length` tokens, one token asked for, answered whole
        (the answer is dropped)."""
        dropped = ("max_completion_tokens", "stream", "stream_options", "return_token_ids")
        body = {k: v for k, v in self.body.items() if k not in dropped}
        body["max_tokens"] = 1
        extension = self.body["kvgate"]
        body["kvgate"] = {**extension, "prompt_token_ids": extension["prompt_token_ids"][:length]}
        return msgspec.json.encode(body)

    async def post(
        self, url: str, payload: bytes, head_timeout_s: float | None = None
    ) -> UpstreamResponse | JoinedAnswer:
        """Send the prefill pieces, then the prompt part (`payload`, from `first_part`); what the pool's
        `post` answers to a piece or the prompt part that is not a 200, or, on a 200, the answer joined
        from all parts."""
        for length in self.pieces:
            refused = await self._post_piece(url, length)
            if refused is not None:
                return refused  # refused or failed: the relay answers it as the worker's
        if self.before_prompt is not None:
            self.before_prompt(len(self.body["kvgate"]["prompt_token_ids"]))
        resp = await self.pool.post(url, payload, head_timeout_s)
        if resp.status != 200:
            return resp
        return JoinedAnswer(self, url, resp)

    async def _post_piece(self, url: str, length: int) -> UpstreamResponse | None:
        """One prefill piece, read to its end; its answer when it is not a 200, else None."""
        if self.before_prompt is not None:
            self.before_prompt(length)
        resp = await self.pool.post(url, self.piece(length))
        if resp.status != 200:
            return resp
        try:
            answer = _object(await resp.read())
        finally:
            resp.release()
        if self.prompt_details is None:
            usage = answer.get("usage")
            details = usage.get("prompt_tokens_details") if isinstance(usage, dict) else None
            self.prompt_details = details if isinstance(details, dict) else {"cached_tokens": 0}
        return None

    def with_cached_before_pieces(self, usage: Any) -> None:
        """The prompt part's usage (a dict, edited) with the cached tokens of before the first piece,
        where there were pieces: what the pieces computed was not cached when the turn came."""
        if self.prompt_details is not None and isinstance(usage, dict):
            usage["prompt_tokens_details"] = self.prompt_details


class _Part:
    """What the joined stream keeps of a part that another may follow, until its end says whether one
    does."""

    __slots__ = ("finish", "size", "token_ids", "usage")

    def __init__(self, size: int) -> None:
        self.size = size  # the output tokens it asked for
        self.token_ids: list[int] = []
        self.finish: dict[str, Any] | None = None  # its finish chunk, its output (if any) sent already
        self.usage: dict[str, Any] | None = None  # its usage chunk


class JoinedAnswer:
    """The parts' answers read as one `UpstreamResponse` (the members the relays use)."""

    def __init__(self, split: SplitTurn, url: str, first: UpstreamResponse) -> None:
        self.split = split
        self.url = url
        self.status = first.status
        self.headers = first.headers
        self._resp: UpstreamResponse | _DecodePart = first
        self._part: _Part | None = _Part(1)  # the part in flight while another may follow; None: the last
        self._parts = 1  # parts sent
        self._output_ids: list[int] = []  # the output of the parts before the one in flight
        self._first_usage: Any = None  # the first part's usage, joined into the last part's
        self._created: Any = None  # the first part's `created`, kept by the other parts' chunks
        self._created_member = b""  # its JSON member: a chunk that has it needs no edit for it
        self._buffer = b""
        self._done = False
        self._committed = False
        self._slice_id: str | None = None  # the slice in flight that a prompt may cut (`SliceCuts`)
        self._slices = 0  # slices registered, for their ids
        self._cut = False  # the slice in flight was cut: go on with the next one

    @property
    def complete(self) -> bool:
        return self._done

    def cut(self, slice_id: str) -> bool:
        """End the slice in flight now (its stream closed: the worker aborts it) and go on with the next
        one from the output relayed so far; False when `slice_id` is no longer the one in flight."""
        part = self._part
        if slice_id != self._slice_id or part is None or part.finish is not None:
            return False
        self._slice_id = None
        self._cut = True
        self._resp.close()
        return True

    def _register_slice(self) -> None:
        """The part just started is a slice another may follow: a prompt that does not fit may cut it."""
        cuts = self.split.cuts
        if cuts is None or self._part is None:
            return
        request_id, worker_id, blocks = self.split.slice_owner
        self._slices += 1
        self._slice_id = f"{request_id}/slice{self._slices}"
        cuts.sent(self._slice_id, self, worker_id, blocks)

    def _started_slice(self) -> None:
        """The part's first token came: a slice runs from now (it no longer waits in the worker's queue)."""
        if self._slice_id is not None and self.split.cuts is not None:
            self.split.cuts.started(self._slice_id)

    def _end_slice(self) -> None:
        if self._slice_id is not None and self.split.cuts is not None:
            self.split.cuts.ended(self._slice_id)
        self._slice_id = None

    def commit(self) -> None:
        self._committed = True
        self._resp.commit()

    def release(self) -> None:
        self._end_slice()
        self._resp.release()

    def close(self) -> None:
        self._end_slice()
        self._resp.close()

    # --- a whole answer

    async def read(self) -> bytes:
        answer = _object(await self._resp.read())
        self.split.with_cached_before_pieces(answer.get("usage"))
        choice = _first_choice(answer)
        ids = _pop_ids(answer, choice)
        self._done = True
        if not self._continues(choice.get("finish_reason"), ids, 1):
            return msgspec.json.encode(answer)
        text = _answer_text(choice)
        last: dict[str, Any] = answer
        size = 1
        while self._continues(choice.get("finish_reason"), ids, size):
            self._output_ids += ids
            size = self.split.part_size(len(self._output_ids))
            self._next_part()
            last = _object(await self._resp.read())
            choice = _first_choice(last)
            ids = _pop_ids(last, choice)
            text += _answer_text(choice)
        if isinstance(choice.get("message"), dict):  # chat: the message's content goes on
            choice["message"]["content"] = text
        else:
            choice["text"] = text
        answer["choices"][0] = choice
        answer["usage"] = self._joined_usage(answer.get("usage"), last.get("usage"))
        return msgspec.json.encode(answer)

    # --- a stream

    async def read_chunk(self) -> bytes:
        while not self._done:
            try:
                chunk = await self._resp.read_chunk()
            except UpstreamError:
                if not self._cut:
                    raise
            if self._cut:  # what came after the cut was not relayed: the next slice goes on before it
                self._after_cut()
                continue
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
                if self._part is not None:
                    edited = await self._held_event(self._part, event)
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

    async def _held_event(self, part: _Part, event: bytes) -> bytes:
        """An event of a part that another may follow: relayed at once, but for its end, held until it
        is known whether the next part follows."""
        data = _data(event)
        if data is None:
            return event
        if data == _DONE:
            return await self._part_end(part, event)
        chunk = _object(data)
        if self._parts == 1:
            if self._created is None:
                self._created = chunk.get("created")
        elif self._created is not None:
            chunk["created"] = self._created
        if chunk.get("choices") == [] and chunk.get("usage"):
            if self._parts == 1:
                self.split.with_cached_before_pieces(chunk["usage"])
            part.usage = chunk  # joined with the next part's, or sent as the answer's
            return b""
        choice = _first_choice(chunk)
        had_ids = bool(part.token_ids)
        _pop_ids(chunk, choice, part.token_ids)
        if part.token_ids and not had_ids:
            self._started_slice()
        if self._parts > 1 and not _without_role(choice):
            return b""
        if choice.get("finish_reason") is None:
            return _event(chunk)
        # its end: sent only if the answer ends here; its output (vLLM sends the last text with the
        # finish reason) leaves now
        output = _take_output(choice)
        part.finish = msgspec.json.decode(msgspec.json.encode(chunk))  # a copy, without the output
        if not output:
            return b""
        _put_output(choice, output)
        choice["finish_reason"] = None
        choice.pop("stop_reason", None)
        return _event(chunk)

    async def _part_end(self, part: _Part, done: bytes) -> bytes:
        """A held part's [DONE]: the answer's end (its finish and usage, then `done`), or the next part."""
        self._end_slice()  # ended: no longer a slice to cut
        finish = part.finish
        reason = _first_choice(finish).get("finish_reason") if finish is not None else None
        usage = part.usage.get("usage") if part.usage is not None else None
        if self._parts == 1:
            self._first_usage = usage
        if not self._continues(reason, part.token_ids, part.size):  # the answer ends with this part
            self._done = True
            if part.usage is not None and self._parts > 1:
                part.usage["usage"] = self._joined_usage(self._first_usage, usage)
            return b"".join(_event(chunk) for chunk in (finish, part.usage) if chunk is not None) + done
        await drain(self._resp)
        self._stream_on(part)
        return b""

    def _after_cut(self) -> None:
        """The slice in flight was cut: the next one from the output relayed so far (its token ids)."""
        part = self._part
        assert part is not None  # `cut` cuts only a part that another follows
        self._cut = False
        self._stream_on(part)

    def _stream_on(self, part: _Part) -> None:
        """The stream's next part after `part` (ended, or cut), from the output so far with its tokens."""
        self._output_ids += part.token_ids
        size = self.split.part_size(len(self._output_ids))
        self._next_part()
        if self._parts == 2 and type(self._created) is int:  # as a kvgate worker writes it (compact JSON)
            self._created_member = b'"created":%d,' % self._created
        more = len(self._output_ids) + size < self.split.max_tokens
        self._part = _Part(size) if more else None
        self._buffer = b""
        self._register_slice()

    def _next_part(self) -> None:
        """The part after the output so far, in place of the one that ended (posted on its first read)."""
        self._resp.release()
        self._resp = _DecodePart(self.split, self.url, list(self._output_ids))
        if self._committed:
            self._resp.commit()
        self._parts += 1

    def _rest_event(self, event: bytes) -> bytes:
        """An event of the last part, as the rest of the answer."""
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
            chunk["usage"] = self._joined_usage(self._first_usage, chunk["usage"])
            return _event(chunk)
        choice = _first_choice(chunk)
        _pop_ids(chunk, choice)
        if not _without_role(choice):
            return b""
        return _event(chunk)

    def _continues(self, finish_reason: Any, token_ids: list[int], size: int) -> bool:
        """Whether another part follows one that asked for `size` tokens: it stopped for its length, at
        its size, and the answer's output is not all there yet."""
        return (
            finish_reason == "length"
            and len(token_ids) == size
            and len(self._output_ids) + size < self.split.max_tokens
        )

    def _joined_usage(self, first: Any, last: Any) -> dict[str, Any]:
        """The turn's usage: its prompt and cached tokens from the first part (every other part's prompt
        is the first's plus the output before it), the completion tokens of all."""
        before = len(self._output_ids)  # the parts before the last: one token id per output token
        usage = dict(last) if isinstance(last, dict) else {}
        if isinstance(first, dict):
            prompt = _count(first, "prompt_tokens")
        else:  # none came (a worker that sends none): the last part's prompt less the output before it
            prompt = max(0, _count(last, "prompt_tokens") - before)
        completion = before + _count(last, "completion_tokens")
        usage["prompt_tokens"] = prompt
        usage["completion_tokens"] = completion
        usage["total_tokens"] = prompt + completion
        if isinstance(first, dict) and "prompt_tokens_details" in first:
            usage["prompt_tokens_details"] = first["prompt_tokens_details"]
        return usage


class _DecodePart:
    """A decode part's response, posted on its first read: a refusal or failure there is a worker's
    failure mid-answer (UpstreamError)."""

    def __init__(self, split: SplitTurn, url: str, output_token_ids: list[int]) -> None:
        self.split = split
        self.url = url
        self.payload = split.decode_part(output_token_ids)
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
        if self.released:  # given up (cut, or the client went) while it was being sent: the worker aborts
            resp.close()
            raise UpstreamError("the decode part was given up while it was sent")
        if resp.status != 200:
            resp.release()
            raise UpstreamError(f"the worker answered {resp.status} to a decode part of the turn")
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


def _answer_text(choice: dict[str, Any]) -> str:
    """A whole answer's output: a chat message's content, or a completion's text."""
    message = choice.get("message")
    text = message.get("content") if isinstance(message, dict) else choice.get("text")
    return text if isinstance(text, str) else ""


def _without_role(choice: dict[str, Any]) -> bool:
    """A later part's chunk without its role delta (the answer began in the first part); False when
    nothing is left to send of it."""
    delta = choice.get("delta")
    if isinstance(delta, dict) and "role" in delta:
        del delta["role"]
        if not delta.get("content"):
            delta.pop("content", None)
        if not delta and choice.get("finish_reason") is None:
            return False
    return True
