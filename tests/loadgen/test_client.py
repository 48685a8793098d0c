"""The streaming client against real aiohttp servers that stream awkwardly on purpose."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from gateway.natsd import free_port
from loadgen.client import StreamClient
from loadgen.workloads import Turn
from tests.serving import serving

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Handler], Awaitable[str]]]:
    async with contextlib.AsyncExitStack() as servers:

        async def start(handler: Handler) -> str:
            app = web.Application()
            app.router.add_post("/v1/chat/completions", handler)
            return await servers.enter_async_context(serving(app))

        yield start


def _event(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\r\n\r\n"


def _content(text: str) -> dict:
    return {"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}


TURN = Turn(messages=[{"role": "user", "content": "hi"}], max_tokens=3, tool_result=True)


async def test_sse_split_anywhere_with_crlf_and_comments_is_parsed(serve) -> None:
    seen: list[dict] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append({"headers": dict(request.headers), "body": await request.json()})
        headers = {"content-type": "text/event-stream", "x-kvgate-worker": "w7"}
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        stream = ": keep-alive\r\n\r\n" + _event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]})
        stream += "".join(_event(_content(t)) for t in ("Hel", "lo", " world"))
        stream += _event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        usage = {"prompt_tokens": 40, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 32}}
        stream += _event({"choices": [], "usage": usage}) + "data: [DONE]\r\n\r\n"
        data = stream.encode()
        for i in range(0, len(data), 7):  # cut events, lines and CRLF pairs at arbitrary places
            await response.write(data[i : i + 7])
            await asyncio.sleep(0.001)
        return response

    url = await serve(handler)
    async with StreamClient(url, "m", api_key="k") as client:
        outcome = await client.send(TURN, "sess-1")
    assert outcome.ok, outcome.error
    assert outcome.text == "Hello world" and outcome.finish_reason == "stop"
    assert (outcome.prompt_tokens, outcome.output_tokens, outcome.cached_tokens) == (40, 3, 32)
    assert outcome.worker == "w7"  # the worker a kvgate gateway names
    assert outcome.first_token is not None and outcome.start < outcome.first_token < outcome.end
    assert len(outcome.itl) == 2 and all(gap > 0 for gap in outcome.itl)
    headers, body = seen[0]["headers"], seen[0]["body"]
    assert headers["x-session-id"] == "sess-1" and headers["x-kvgate-tool-call"] == "pending"
    assert headers["Authorization"] == "Bearer k"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_tokens"] == 3 and body["model"] == "m"


async def test_no_session_header_sends_neither_header(serve) -> None:
    seen: list[dict] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write((_event(_content("x")) + "data: [DONE]\n\n").encode())
        return response

    url = await serve(handler)
    async with StreamClient(url + "/v1", "m", session_header=False) as client:
        outcome = await client.send(TURN, "sess-1")
    assert outcome.ok and outcome.output_tokens == 1  # no usage: one token per content event
    assert "x-session-id" not in seen[0] and "x-kvgate-tool-call" not in seen[0]


async def test_errors_are_recorded_with_status_and_message(serve) -> None:
    mode = {"kind": ""}

    async def handler(request: web.Request) -> web.StreamResponse:
        if mode["kind"] == "http":
            error = {
                "message": "max_tokens is too large",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
            return web.json_response({"error": error}, status=400)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        await response.write(_event(_content("x")).encode())
        if mode["kind"] == "event":
            await response.write(_event({"error": {"message": "worker died"}}).encode())
        elif mode["kind"] == "garbage":
            await response.write(b"data: {not json\n\n")
        elif mode["kind"] == "slow":
            await asyncio.sleep(1.5)
        return response  # ends without [DONE]

    url = await serve(handler)
    async with StreamClient(url, "m", timeout_s=0.5) as client:
        results = {}
        for kind in ("http", "event", "garbage", "truncated", "slow"):
            mode["kind"] = kind
            results[kind] = await client.send(TURN, "s")
    assert results["http"].status == 400 and "max_tokens is too large" in results["http"].error
    assert "worker died" in results["event"].error
    assert "bad SSE data" in results["garbage"].error
    assert results["truncated"].error == "stream ended without [DONE]" and results["truncated"].status == 200
    assert results["slow"].error == "timeout"
    async with StreamClient(f"http://127.0.0.1:{free_port()}", "m") as client:
        refused = await client.send(TURN, "s")
    assert refused.status == 0 and "Connect" in refused.error


@pytest.mark.parametrize("step", [1, 2, 3, 7, 4096])
def test_multi_line_data_and_cr_line_ends_parse_at_any_split(step: int) -> None:
    from loadgen.client import ChatStream, Outcome

    payload = (
        ": comment\r\n\r\n"
        + _event(_content("a"))
        + 'data: {"choices":[{"delta":\r\ndata: {"content":"b"}}]}\r\n\r\n'  # one event, two data lines
        + "event: message\rdata: "
        + json.dumps(_content("c"))
        + "\r\r"  # bare CR line ends
        + "data: [DONE]\n\n"
    ).encode()
    outcome = Outcome(start=0.0)
    stream = ChatStream(outcome)
    for i in range(0, len(payload), step):
        stream.feed(payload[i : i + step], float(i))
    stream.finish()
    assert stream.done and outcome.text == "abc" and outcome.output_tokens == 3


def test_an_event_that_never_ends_is_an_error_not_unbounded_memory() -> None:
    from loadgen.client import MAX_EVENT_BYTES, ChatStream, Outcome, StreamError

    stream = ChatStream(Outcome(start=0.0))
    with pytest.raises(StreamError):
        for _ in range(MAX_EVENT_BYTES // (1 << 20) + 2):
            stream.feed(b"x" * (1 << 20), 0.0)
