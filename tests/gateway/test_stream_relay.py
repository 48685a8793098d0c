"""The stream relay against a worker that never ends an event: it is cut at a bound, before the first
event (the turn may go to another worker) and after it (the client's stream ends with an error), and
its bytes are not held meanwhile. Real HTTP on both sides: a raw worker, the gateway's relay in an
aiohttp handler, aiohttp's client."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web

from gateway import stream_relay
from gateway.metrics import GatewayMetrics
from gateway.natsd import free_port
from gateway.proxy import Retryable, forward
from gateway.upstream import UpstreamPool
from tests.serving import serving

EVENT = (
    b'data: {"id":"c","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
)
JUNK = b"x" * 65536  # no event's end in it


async def _worker(
    parts: tuple[bytes, ...], gap_s: float = 0.0, end: bool = False
) -> tuple[asyncio.Server, str]:
    """A worker that streams `parts`, each `gap_s` after the one before, and with `end` ends its body
    (else it stops writing once the client leaves)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        try:
            for part in parts:
                if gap_s:
                    await asyncio.sleep(gap_s)
                if part:
                    writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                    await writer.drain()
            if end:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    port = free_port()
    return await asyncio.start_server(
        handle, "127.0.0.1", port
    ), f"http://127.0.0.1:{port}/v1/chat/completions"


async def _relay_through_a_gateway(
    first: bytes,
    worker: tuple[asyncio.Server, str] | None = None,
    read_timeout_s: float = 30.0,
    first_tokens: list[float] | None = None,
) -> tuple[int, bytes]:
    """The status and body a client gets through the relay from a worker that streams `first`, then
    bytes without an event's end until the client leaves (or from `worker`)."""
    server, worker_url = worker or await _worker((first, *(JUNK for _ in range(10_000))))
    pool = UpstreamPool(read_timeout_s=read_timeout_s)
    metrics = GatewayMetrics()
    reported = first_tokens if first_tokens is not None else []  # first tokens, s after the request

    async def chat(request: web.Request) -> web.StreamResponse:
        clock = asyncio.get_running_loop().time
        started = clock()

        def on_first_token() -> None:
            reported.append(clock() - started)

        try:
            response, _ = await forward(
                pool, worker_url, b"{}", request=request, stream=True, client_wants_usage=False,
                headers={}, metrics=metrics, on_first_token=on_first_token,
            )  # fmt: skip
        except Retryable as exc:
            return web.Response(status=502, text=str(exc))
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    try:
        async with (
            serving(app) as url,
            aiohttp.ClientSession() as http,
            http.post(url + "/v1/chat/completions", data=b"{}") as answer,
        ):
            status, body = answer.status, await answer.read()
            assert len(reported) == (status == 200)  # once, when the client's stream opened
            return status, body
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()


@pytest.fixture(autouse=True)
def small_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream_relay, "MAX_EVENT_BYTES", 1 << 20)


async def test_before_the_first_event_the_turn_may_be_retried() -> None:
    status, body = await _relay_through_a_gateway(b"")
    assert status == 502 and b"without an event's end" in body


async def test_after_the_first_event_the_client_gets_an_error_event() -> None:
    status, body = await _relay_through_a_gateway(EVENT)
    assert status == 200 and body.startswith(EVENT)
    assert b"without an event's end" in body[len(EVENT) :]


KEEPALIVE = b": keepalive\n\n"
DONE = b"data: [DONE]\n\n"


async def test_keepalives_outlast_the_read_timeout_and_never_reach_the_client() -> None:
    # a worker whose turn waits 0.7 s for its first token, with a comment every 0.1 s meanwhile
    # (engines/loop.py), read with a 0.3 s timeout: the turn is served, the comments are not relayed,
    # and the first token is the event's, not the first comment's
    worker = await _worker((*[KEEPALIVE] * 6, EVENT, KEEPALIVE + DONE), gap_s=0.1, end=True)
    first_tokens: list[float] = []
    status, body = await _relay_through_a_gateway(b"", worker, read_timeout_s=0.3, first_tokens=first_tokens)
    assert status == 200 and body == EVENT + DONE
    assert first_tokens[0] >= 0.6


async def test_a_silent_worker_still_times_out() -> None:
    worker = await _worker((EVENT, DONE), gap_s=0.6, end=True)
    status, body = await _relay_through_a_gateway(b"", worker, read_timeout_s=0.3)
    assert status == 502 and b"stopped sending" in body
