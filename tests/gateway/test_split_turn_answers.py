"""How gateway/split_turn.py joins two parts' answers, on answer shapes kvgate's worker does not send:
the last text and the finish reason in one chunk (as vLLM sends them), another second in the decode
part's `created`, a decode part the worker refuses. A worker's stand-in serves them over real HTTP to
the real upstream pool (no engine sends these shapes here)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from aiohttp import web

from gateway.split_turn import JoinedAnswer, SplitTurn, split_max_tokens
from gateway.upstream import UpstreamError, UpstreamPool
from tests.serving import serving

PROMPT = [5, 6, 7]
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}


def chunk(created: int, choices: list[dict[str, Any]], **extra: Any) -> bytes:
    body = {"id": "chatcmpl-r", "object": "chat.completion.chunk", "created": created, "model": "m"}
    return b"data: " + json.dumps({**body, "choices": choices, **extra}).encode() + b"\n\n"


def usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


class StandIn:
    """Answers the prompt part with its last text and finish reason in one chunk (vLLM's way), and the
    decode part from another second, or with `decode_status`."""

    def __init__(self, decode_status: int = 200) -> None:
        self.decode_status = decode_status
        self.bodies: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        first = body.get("return_token_ids") is True
        if not first and self.decode_status != 200:
            return web.json_response({"error": {"message": "busy"}}, status=self.decode_status)
        if not body.get("stream"):
            return web.json_response(self._whole(first))
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        if first:
            events = [
                chunk(100, [{"index": 0, "delta": {"role": "assistant", "content": ""}, "token_ids": []}],
                      prompt_token_ids=PROMPT),
                chunk(100, [{"index": 0, "delta": {"content": "Hel"}, "finish_reason": "length",
                             "token_ids": [42]}]),
                chunk(100, [], usage=usage(3, 1, 2)),
            ]  # fmt: skip
        else:
            events = [
                chunk(101, [{"index": 0, "delta": {"role": "assistant", "content": ""}}]),
                chunk(101, [{"index": 0, "delta": {"content": "lo"}}]),
                chunk(101, [{"index": 0, "delta": {"content": "!"}, "finish_reason": "stop"}]),
                chunk(101, [], usage=usage(4, 2, 3)),
            ]
        await response.write(b"".join(events) + b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _whole(self, first: bool) -> dict[str, Any]:
        message = {"role": "assistant", "content": "Hel" if first else "lo!"}
        choice: dict[str, Any] = {"index": 0, "message": message}
        choice["finish_reason"] = "length" if first else "stop"
        answer = {"id": "chatcmpl-r", "object": "chat.completion", "created": 100, "model": "m"}
        if first:
            choice["token_ids"] = [42]
            answer["prompt_token_ids"] = PROMPT
        return {**answer, "choices": [choice], "usage": usage(3, 1, 2) if first else usage(4, 2, 3)}


@contextlib.asynccontextmanager
async def joined(stand_in: StandIn, stream: bool) -> AsyncIterator[JoinedAnswer]:
    """The turn's answer from `stand_in`, joined, through a real upstream pool and real HTTP."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", stand_in.handle)
    body = {**BODY, "stream": stream, "kvgate": {"prompt_token_ids": PROMPT, "request_id": "r"}}
    pool = UpstreamPool()
    try:
        async with serving(app) as url:
            split = SplitTurn(pool, body, 4, -11, stream)
            answer = await split.post(url + "/v1/chat/completions", split.first_part())
            try:
                yield answer
            finally:
                answer.release()
    finally:
        await pool.close()


async def read_stream(answer: JoinedAnswer) -> list[bytes]:
    raw = b""
    while chunk_bytes := await answer.read_chunk():
        raw += chunk_bytes
    return [e + b"\n\n" for e in raw.split(b"\n\n") if e]


async def test_a_vllm_shaped_stream_joins_into_one_answer() -> None:
    stand_in = StandIn()
    async with joined(stand_in, stream=True) as answer:
        events = await read_stream(answer)
    assert events[-1] == b"data: [DONE]\n\n"
    chunks = [msgspec.json.decode(e[5:]) for e in events[:-1]]
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert "".join(c["delta"].get("content", "") for c in choices) == "Hello!"
    assert [c["delta"].get("role") for c in choices].count("assistant") == 1
    assert [c["finish_reason"] for c in choices if c.get("finish_reason")] == ["stop"]
    assert all("token_ids" not in c for c in choices) and all("prompt_token_ids" not in c for c in chunks)
    assert {c["created"] for c in chunks} == {100}  # the decode part's second is the first's
    assert chunks[-1]["usage"] == usage(3, 3, 2)  # the prompt's, completion of both, first part's cache
    first, decode = stand_in.bodies
    assert first["max_tokens"] == 1 and first["return_token_ids"] is True and "priority" not in first
    assert decode["max_tokens"] == 3 and decode["priority"] == -11 and "return_token_ids" not in decode
    assert decode["kvgate"] == {"prompt_token_ids": PROMPT, "request_id": "r", "output_token_ids": [42]}


async def test_a_whole_answer_joins_too() -> None:
    async with joined(StandIn(), stream=False) as answer:
        body = msgspec.json.decode(await answer.read())
    choice = body["choices"][0]
    assert choice["message"]["content"] == "Hello!" and choice["finish_reason"] == "stop"
    assert body["usage"] == usage(3, 3, 2) and "prompt_token_ids" not in body
    assert "token_ids" not in body["choices"][0]


@pytest.mark.parametrize("stream", [True, False])
async def test_a_refused_decode_part_is_a_worker_failure(stream: bool) -> None:
    async with joined(StandIn(decode_status=503), stream=stream) as answer:
        if stream:
            first = await answer.read_chunk()
            assert b"Hel" in first  # the first token reached the client before the decode part failed
            with pytest.raises(UpstreamError, match="503"):
                while await answer.read_chunk():
                    pass
        else:
            with pytest.raises(UpstreamError, match="503"):
                await answer.read()


def test_only_answers_that_join_exactly_are_split() -> None:
    assert split_max_tokens({"max_tokens": 8}) == 8
    assert split_max_tokens({"max_completion_tokens": 5, "max_tokens": 8}) == 5
    for body in (
        {},  # the worker's default: its to choose
        {"max_tokens": 1},
        {"max_tokens": True},
        {"max_tokens": 8, "stop": ["\n"]},
        {"max_tokens": 8, "return_token_ids": True},
    ):
        assert split_max_tokens(body) is None


OUTPUT = "ABCDEFGHIJ"  # the answer of the sliced stand-in: a token a letter, its id the letter's code


class SlicedStandIn:
    """Answers every part of a turn sent in slices as vLLM would: the output from the part's
    `kvgate.output_token_ids` on, `max_tokens` of it (the last text with the finish reason), its token
    ids where asked; EOS after `eos_after` output tokens, a part numbered `fail_part` refused."""

    def __init__(self, eos_after: int | None = None, fail_part: int | None = None) -> None:
        self.eos_after = eos_after
        self.fail_part = fail_part
        self.bodies: list[dict[str, Any]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if len(self.bodies) - 1 == self.fail_part:
            return web.json_response({"error": {"message": "busy"}}, status=503)
        start = len(body["kvgate"].get("output_token_ids", []))
        end = min(start + body["max_tokens"], len(OUTPUT))
        reason = "length"
        if self.eos_after is not None and self.eos_after < end:
            end, reason = self.eos_after + 1, "stop"  # the EOS is a token of its own, with no text
        letters = OUTPUT[start:end] if reason == "length" else OUTPUT[start : end - 1]
        ids = [ord(c) for c in OUTPUT[start:end]]
        ids_asked = body.get("return_token_ids") is True
        part_usage = usage(len(PROMPT) + start, end - start, len(PROMPT) + start - 1)
        created = 100 + len(self.bodies) - 1
        if not body.get("stream"):
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": letters}}
            choice["finish_reason"] = reason
            if ids_asked:
                choice["token_ids"] = ids
            answer = {"id": "chatcmpl-r", "object": "chat.completion", "created": created, "model": "m"}
            return web.json_response({**answer, "choices": [choice], "usage": part_usage})
        events = [chunk(created, [{"index": 0, "delta": {"role": "assistant", "content": ""}}])]
        for i in range(start, end):
            last = i == end - 1
            choice = {"index": 0, "delta": {"content": OUTPUT[i] if i < len(letters) + start else ""}}
            if last:
                choice["finish_reason"] = reason
            if ids_asked:
                choice["token_ids"] = [ord(OUTPUT[i])]
            events.append(chunk(created, [choice]))
        events.append(chunk(created, [], usage=part_usage))
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"".join(events) + b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@contextlib.asynccontextmanager
async def sliced(
    stand_in: SlicedStandIn, stream: bool, max_tokens: int, slice_tokens: int
) -> AsyncIterator[JoinedAnswer]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", stand_in.handle)
    body = {**BODY, "stream": stream, "kvgate": {"prompt_token_ids": PROMPT, "request_id": "r"}}
    pool = UpstreamPool()
    try:
        async with serving(app) as url:
            split = SplitTurn(pool, body, max_tokens, 0, stream, slice_tokens)
            answer = await split.post(url + "/v1/chat/completions", split.first_part())
            try:
                yield answer
            finally:
                answer.release()
    finally:
        await pool.close()


def joined_stream(events: list[bytes]) -> tuple[str, list[str], list[dict[str, Any]]]:
    """A joined stream's text, finish reasons and chunks, checked for one role, one [DONE], one created."""
    assert events[-1] == b"data: [DONE]\n\n" and b"".join(events).count(b"[DONE]") == 1
    chunks = [msgspec.json.decode(e[5:]) for e in events[:-1]]
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert [c["delta"].get("role") for c in choices].count("assistant") == 1
    assert all("token_ids" not in c for c in choices) and all("prompt_token_ids" not in c for c in chunks)
    assert {c["created"] for c in chunks} == {100}
    text = "".join(c["delta"].get("content", "") for c in choices)
    return text, [c["finish_reason"] for c in choices if c.get("finish_reason")], chunks


@pytest.mark.parametrize("stream", [True, False])
async def test_a_decode_in_slices_joins_into_one_answer(stream: bool) -> None:
    """Ten tokens in slices of three: parts of 1, 3, 3 and 3 tokens, each continuing the output so far,
    with its token ids asked for where another part follows; the client reads one answer."""
    stand_in = SlicedStandIn()
    async with sliced(stand_in, stream, 10, 3) as answer:
        if stream:
            text, reasons, chunks = joined_stream(await read_stream(answer))
            final_usage = chunks[-1]["usage"]
        else:
            body = msgspec.json.decode(await answer.read())
            text, reasons = body["choices"][0]["message"]["content"], [body["choices"][0]["finish_reason"]]
            final_usage = body["usage"]
            assert "token_ids" not in body["choices"][0] and body["created"] == 100
    assert text == OUTPUT and reasons == ["length"]
    assert final_usage == usage(3, 10, 2)  # the prompt's, every part's completion, the first's cache
    parts = [
        (b["max_tokens"], b.get("return_token_ids"), b["kvgate"].get("output_token_ids"))
        for b in stand_in.bodies
    ]
    codes = [ord(c) for c in OUTPUT]
    assert parts == [(1, True, None), (3, True, codes[:1]), (3, True, codes[:4]), (3, None, codes[:7])]


@pytest.mark.parametrize("stream", [True, False])
async def test_a_slice_that_stops_short_ends_the_answer(stream: bool) -> None:
    """EOS as the answer's sixth token, in the third part (tokens 5-7): no fourth part; the answer ends
    there with its finish reason, its usage counting the five tokens and the EOS."""
    stand_in = SlicedStandIn(eos_after=5)
    async with sliced(stand_in, stream, 10, 3) as answer:
        if stream:
            text, reasons, chunks = joined_stream(await read_stream(answer))
            final_usage = chunks[-1]["usage"]
        else:
            body = msgspec.json.decode(await answer.read())
            text, reasons = body["choices"][0]["message"]["content"], [body["choices"][0]["finish_reason"]]
            final_usage = body["usage"]
    assert text == OUTPUT[:5] and reasons == ["stop"]
    assert final_usage == usage(3, 6, 2)
    assert [b["max_tokens"] for b in stand_in.bodies] == [1, 3, 3]


@pytest.mark.parametrize("stream", [True, False])
async def test_a_refused_slice_is_a_worker_failure(stream: bool) -> None:
    async with sliced(SlicedStandIn(fail_part=2), stream, 10, 3) as answer:
        if stream:
            begun = await answer.read_chunk()
            assert b"A" in begun
            with pytest.raises(UpstreamError, match="503"):
                while await answer.read_chunk():
                    pass
        else:
            with pytest.raises(UpstreamError, match="503"):
                await answer.read()
