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


async def _worker(first: bytes) -> tuple[asyncio.Server, str]:
    """A worker that streams `first`, then bytes without an event's end until the client leaves."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
        )
        try:
            for part in (first, *(JUNK for _ in range(10_000))):
                if part:
                    writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    port = free_port()
    return await asyncio.start_server(
        handle, "127.0.0.1", port
    ), f"http://127.0.0.1:{port}/v1/chat/completions"


async def _relay_through_a_gateway(first: bytes) -> tuple[int, bytes]:
    """The status and body a client gets through the relay from such a worker."""
    server, worker_url = await _worker(first)
    pool = UpstreamPool(read_timeout_s=30.0)
    metrics = GatewayMetrics()

    async def chat(request: web.Request) -> web.StreamResponse:
        try:
            response, _ = await forward(
                pool, worker_url, b"{}", request=request, stream=True, client_wants_usage=False,
                headers={}, metrics=metrics, on_first_token=lambda: None,
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
            return answer.status, await answer.read()
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
