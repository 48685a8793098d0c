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
