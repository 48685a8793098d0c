"""The gateway's HTTP client against a real aiohttp server: bodies by length, chunked (with a trailer)
and until close; keep-alive reuse, a stale pooled connection, refusal and timeouts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from gateway import upstream
from gateway.natsd import free_port
from gateway.upstream import UpstreamError, UpstreamPool, dechunk
from tests.serving import serving


async def raw_server(handler) -> tuple[asyncio.Server, int]:  # type: ignore[no-untyped-def]
    port = free_port()
    return await asyncio.start_server(handler, "127.0.0.1", port), port


@pytest.fixture
async def app_url() -> AsyncIterator[str]:
    async def whole(request: web.Request) -> web.Response:
        return web.json_response({"echo": (await request.read()).decode()})

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for i in range(3):
            await response.write(f"data: {i}\n\n".encode())
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    async def slow(_request: web.Request) -> web.Response:
        await asyncio.sleep(1)
        return web.Response(text="late")

    app = web.Application()
    app.router.add_post("/whole", whole)
    app.router.add_post("/stream", stream)
    app.router.add_post("/slow", slow)
    async with serving(app, keepalive_timeout=0.3) as url:
        yield url


async def test_bodies_and_keep_alive(app_url: str) -> None:
    pool = UpstreamPool(read_timeout_s=2.0)
    for i in range(3):  # the same connection serves them all
        resp = await pool.post(app_url + "/whole", f"body {i}".encode())
        assert resp.status == 200 and await resp.read() == f'{{"echo": "body {i}"}}'.encode()
        resp.release()
        assert len(pool._idle[("127.0.0.1", int(app_url.rsplit(":", 1)[1]))]) == 1
    resp = await pool.post(app_url + "/stream", b"{}")
    chunks = [chunk async for chunk in resp.iter_chunks()]
    assert b"".join(chunks) == b"data: 0\n\ndata: 1\n\ndata: 2\n\n" and resp.complete
    resp.release()
    await asyncio.sleep(0.6)  # the server drops the idle connection: the pool must notice and reconnect
    resp = await pool.post(app_url + "/whole", b"again")
    assert await resp.read() == b'{"echo": "again"}'
    resp.release()
    await pool.close()


async def test_refused_timed_out_and_broken_responses(app_url: str) -> None:
    pool = UpstreamPool(connect_timeout_s=1.0, read_timeout_s=0.3)
    with pytest.raises(UpstreamError):
        await pool.post(f"http://127.0.0.1:{free_port()}/x", b"{}")
    with pytest.raises(UpstreamError, match="timeout"):
        await pool.post(app_url + "/slow", b"{}")

    async def chunked_then_trailer_then_cut(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc")
        await writer.drain()
        writer.close()

    server, port = await raw_server(chunked_then_trailer_then_cut)
    resp = await pool.post(f"http://127.0.0.1:{port}/a", b"{}")
    assert await resp.read() == b"abc"
    resp.release()
    resp = await pool.post(
        f"http://127.0.0.1:{port}/b", b"{}"
    )  # reuses the connection: parsing stayed aligned
    with pytest.raises(UpstreamError, match="mid-body"):
        await resp.read()
    resp.release()
    server.close()
    await pool.close()


def test_dechunk_takes_every_whole_chunk_and_keeps_the_rest() -> None:
    body = b"3\r\nabc\r\n2;ext=1\r\nde\r\n0\r\nx-t: 1\r\n\r\n"
    assert dechunk(body) == ([b"abc", b"de"], len(body), True)
    for cut in range(len(body)):  # a cut anywhere: the whole chunks before it, nothing half-read
        payloads, used, last = dechunk(body[:cut])
        assert not last and b"".join(payloads) == b"abcde"[: len(b"".join(payloads))]
        rest, _, last = dechunk(body[used:])
        assert last and b"".join(payloads + rest) == b"abcde"
    hex_size = b"A\r\n0123456789\r\n0\r\n\r\n"
    assert dechunk(hex_size) == ([b"0123456789"], len(hex_size), True)
    for bad in (b"-3\r\nabc\r\n", b"zz\r\n", b"\r\n", b"3\r\nabcd\r\n", b"0x3\r\nabc\r\n"):
        with pytest.raises(ValueError):
            dechunk(bad)


async def test_events_and_the_last_chunk_in_one_read_end_the_body() -> None:
    """A caller that stops at the event it waited for still finds the body complete when the last
    chunk came in the same read (a second iteration would wait for bytes that never come)."""

    async def events_and_end_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (b"data: 1\n\n", b"data: 2\n"))
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")
        await writer.drain()
        await reader.read()  # holds the connection open until the client closes it

    server, port = await raw_server(events_and_end_at_once)
    pool = UpstreamPool(read_timeout_s=30.0)
    resp = await pool.post(f"http://127.0.0.1:{port}/a", b"{}")
    received = b""
    async for chunk in resp.iter_chunks():
        received += chunk
        if received.endswith(b"data: 2\n"):
            break
    assert resp.complete and [chunk async for chunk in resp.iter_chunks()] == []
    resp.release()
    await pool.close()
    server.close()


async def test_only_plain_http_worker_urls_are_sent_to(app_url: str) -> None:
    pool = UpstreamPool()
    try:
        for url in ("https://127.0.0.1:1/v1/x", "unix:///tmp/x", "http:///no-host"):
            for _ in range(2):  # refused again, not remembered as a target
                with pytest.raises(UpstreamError, match="plain http only"):
                    await pool.post(url, b"{}")
        for _ in range(2):  # the second time from the parsed target
            resp = await pool.post(app_url + "/whole", b'{"a":1}')
            assert resp.status == 200 and b'{\\"a\\":1}' in await resp.read()
            resp.release()
    finally:
        await pool.close()


async def test_the_read_timeout_is_per_read_and_a_shorter_head_timeout_applies_at_once() -> None:
    """A stream whose gaps are each under the read timeout is read to its end however long it lasts;
    one that stalls mid-body times out; a head timeout shorter than the connection's last read
    timeout is kept on a reused connection (the deadline timer is set earlier, not left later)."""
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            await reader.readexactly(2)  # the body, b"{}"
            if head.startswith(b"POST /slow-events"):
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                for i in range(4):  # 4 x 0.6 s: longer than the 2 s read timeout, each gap well under
                    await asyncio.sleep(0.6)
                    writer.write(b"9\r\ndata: %d\n\n\r\n" % i)
                writer.write(b"0\r\n\r\n")
            elif head.startswith(b"POST /stall"):
                writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n9\r\ndata: 0\n\n\r\n")
                await release.wait()
                return
            elif head.startswith(b"POST /quick"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            else:  # /never: no answer
                await release.wait()
                return
            await writer.drain()

    server, port = await raw_server(handler)
    url = f"http://127.0.0.1:{port}"
    pool = UpstreamPool(read_timeout_s=2.0)
    try:
        resp = await pool.post(url + "/slow-events", b"{}")
        chunks = [chunk async for chunk in resp.iter_chunks()]
        assert b"".join(chunks) == b"".join(b"data: %d\n\n" % i for i in range(4)) and resp.complete
        resp.release()

        patient = UpstreamPool(read_timeout_s=60.0)
        resp = await patient.post(url + "/quick", b"{}")
        assert await resp.read() == b"ok"
        resp.release()
        # the reused connection's timer was set for the 60 s read timeout: the head's 0.2 s must hold
        # (were it left at 60 s, `wait_for` would end the call first, with another exception)
        with pytest.raises(UpstreamError, match="timeout"):
            await asyncio.wait_for(patient.post(url + "/never", b"{}", head_timeout_s=0.2), 20)
        await patient.close()

        stalling = UpstreamPool(read_timeout_s=0.3)
        resp = await stalling.post(url + "/stall", b"{}")
        received = []
        with pytest.raises(UpstreamError, match="stopped sending"):
            async for chunk in resp.iter_chunks():
                received.append(chunk)
        assert received == [b"data: 0\n\n"]
        resp.release()
        await stalling.close()
    finally:
        release.set()
        await pool.close()
        server.close()


async def _endless(writer: asyncio.StreamWriter, head: bytes, block: bytes) -> None:
    """`head`, then `block` again and again until the client hangs up."""
    writer.write(head)
    try:
        while True:
            writer.write(block)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("head", "block", "error"),
    [
        # one chunk that never ends: its undecoded bytes must not pile up
        (b"transfer-encoding: chunked\r\n\r\n7fffffff\r\n", b"x" * 65536, "chunk of over"),
        # chunks without end, and a length the body never reaches: the answer read whole is bounded
        (b"transfer-encoding: chunked\r\n\r\n", b"10000\r\n" + b"x" * 65536 + b"\r\n", "answer exceeds"),
        (b"content-length: 4294967296\r\n\r\n", b"x" * 65536, "answer exceeds"),
    ],
    ids=["one-chunk", "chunks", "length"],
)
async def test_an_endless_answer_is_cut_at_a_bound(
    monkeypatch: pytest.MonkeyPatch, head: bytes, block: bytes, error: str
) -> None:
    monkeypatch.setattr(upstream, "MAX_ANSWER_BYTES", 1 << 20)
    monkeypatch.setattr(upstream, "MAX_CHUNK_BYTES", 1 << 20)

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await _endless(writer, b"HTTP/1.1 200 OK\r\n" + head, block)

    server, port = await raw_server(endless)
    pool = UpstreamPool(read_timeout_s=30.0)
    try:
        resp = await pool.post(f"http://127.0.0.1:{port}/v1/x", b"{}")
        with pytest.raises(UpstreamError, match=error):
            await resp.read()
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()
