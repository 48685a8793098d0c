"""A small HTTP/1.1 client for the gateway's hop to its workers: keep-alive pool, one request at a time
per connection, Content-Length and chunked bodies.

aiohttp's client costs about as much CPU per request as its server; on the gateway's hot path that
doubled the price of proxying. This does only what the hop needs: POST a JSON body to a worker, read
the status and headers, then the body whole or chunk by chunk as it arrives.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import defaultdict
from collections.abc import AsyncGenerator, Callable
from typing import Protocol
from urllib.parse import urlsplit

MAX_HEADER_BYTES = 64 * 1024
# a worker's answer is untrusted too: one read whole, or one chunk, past these is a broken worker, not a
# reason to hold its bytes (a whole answer of 128k tokens with logprobs is a few MB)
MAX_ANSWER_BYTES = 64 * 1024 * 1024
MAX_CHUNK_BYTES = 16 * 1024 * 1024
MAX_IDLE_PER_HOST = 256
MAX_TARGETS = 1024  # parsed worker URLs kept (workers come and go: the dict is emptied when full)
_HEX_DIGITS = b"0123456789abcdefABCDEF"


class UpstreamError(ConnectionError):
    """The worker could not be reached, hung up, timed out or broke the protocol."""


class _Conn:
    """One keep-alive connection to a worker, with its read deadline.

    A read must get bytes within its timeout, else the connection is aborted and the read raises
    TimeoutError. One lazy timer per connection keeps that deadline: a read moves `deadline` and the
    timer, when it fires early, sets itself again for the new one. An `asyncio.timeout` per read
    costs a timer and a context of its own on every read, 2-4 a turn (docs/EXPERIMENTS.md, "Gateway
    CPU, fourth pass")."""

    __slots__ = (
        "_loop", "_timer", "aborted", "committed", "deadline", "reader", "reused", "timed_out", "writer",
    )  # fmt: skip

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.reused = False
        self.committed = False  # the client already received bytes of this answer
        self.aborted = False
        self.timed_out = False
        self.deadline = math.inf  # of the read in progress; none between reads
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None

    async def readuntil(self, separator: bytes, timeout_s: float) -> bytes:
        self._expect_within(timeout_s)
        try:
            return await self.reader.readuntil(separator)
        except asyncio.IncompleteReadError:
            self._raise_if_timed_out()
            raise
        finally:
            self.deadline = math.inf

    async def readexactly(self, n: int, timeout_s: float) -> bytes:
        self._expect_within(timeout_s)
        try:
            return await self.reader.readexactly(n)
        except asyncio.IncompleteReadError:
            self._raise_if_timed_out()
            raise
        finally:
            self.deadline = math.inf

    async def read(self, n: int, timeout_s: float) -> bytes:
        self._expect_within(timeout_s)
        try:
            data = await self.reader.read(n)
        finally:
            self.deadline = math.inf
        self._raise_if_timed_out()  # an aborted connection reads as its end
        return data

    def _expect_within(self, timeout_s: float) -> None:
        self.deadline = deadline = self._loop.time() + timeout_s
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.deadline == math.inf:  # no read waiting: the next one sets the timer again
            return
        if self._loop.time() < self.deadline:  # a later read moved the deadline
            self._timer = self._loop.call_at(self.deadline, self._on_timer)
            return
        self.timed_out = True
        self.writer.transport.abort()  # the pending read ends at once

    def _raise_if_timed_out(self) -> None:
        if self.timed_out:
            raise TimeoutError

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        with contextlib.suppress(Exception):
            self.writer.close()


class ChunkedBody(Protocol):
    """A worker's answer body, read chunk by chunk."""

    @property
    def complete(self) -> bool: ...

    async def read_chunk(self) -> bytes: ...


async def drain(body: ChunkedBody) -> None:
    """Read what follows [DONE] (the chunk terminator), so the connection goes back to the pool."""
    if not body.complete:
        with contextlib.suppress(UpstreamError):
            while await body.read_chunk():
                pass


class WorkerAnswer(ChunkedBody, Protocol):
    """A worker's answer as the relays read it: an `UpstreamResponse`, or a split turn's two parts read
    as one (gateway/split_turn.py)."""

    status: int
    headers: dict[str, str]

    def commit(self) -> None: ...

    def release(self) -> None: ...

    def close(self) -> None: ...

    async def read(self) -> bytes: ...


class Upstream(Protocol):
    """What the relays post a turn through: the `UpstreamPool`, or a split turn standing in for it."""

    first_byte_timeout_s: float

    async def post(self, url: str, body: bytes, head_timeout_s: float | None = None) -> WorkerAnswer: ...


class UpstreamResponse:
    def __init__(self, pool: UpstreamPool, key: tuple[str, int], conn: _Conn, status: int,
                 headers: dict[str, str], read_timeout_s: float) -> None:  # fmt: skip
        self._pool = pool
        self._key = key
        self._conn: _Conn | None = conn
        self.status = status
        self.headers = headers
        self._timeout = read_timeout_s
        self._chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self._length = int(length) if length is not None and length.isdigit() else None
        self._keep_alive = headers.get("connection", "").lower() != "close"
        self._done = False
        self._undecoded = b""  # of a chunked body: bytes read past the last whole chunk
        self._left = self._length  # of a Content-Length body: bytes not read yet

    @property
    def complete(self) -> bool:
        return self._done

    def commit(self) -> None:
        """The client has bytes of this answer: a worker that leaves no longer aborts it."""
        if self._conn is not None:
            self._conn.committed = True

    async def read(self) -> bytes:
        conn = self._conn
        if (
            conn is not None
            and not self._done
            and not self._chunked
            and self._length is not None
            and self._length <= 65536  # larger: chunk by chunk, each read with its own timeout
        ):
            # the usual whole answer: one read of a known length, without the chunk iterator's churn
            try:
                data = await conn.readexactly(self._length, self._timeout)
            except TimeoutError as exc:  # before OSError, of which it is a subclass
                self.close()
                raise UpstreamError("the worker stopped sending (read timeout)") from exc
            except asyncio.IncompleteReadError as exc:
                self.close()
                raise UpstreamError("the worker closed the connection mid-body") from exc
            except (OSError, asyncio.LimitOverrunError, ValueError) as exc:
                self.close()
                raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc
            self._done = True
            return data
        parts: list[bytes] = []
        size = 0
        async for chunk in self.iter_chunks():
            size += len(chunk)
            if size > MAX_ANSWER_BYTES:
                self.close()
                raise UpstreamError(f"the worker's answer exceeds {MAX_ANSWER_BYTES} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def iter_chunks(self) -> AsyncGenerator[bytes, None]:
        """The body as it arrives; raises UpstreamError when the worker breaks off."""
        while chunk := await self.read_chunk():
            yield chunk

    async def read_chunk(self) -> bytes:
        """The next bytes of the body as they arrive, b"" once it was read to its end; raises
        UpstreamError when the worker breaks off. A coroutine per read, not a generator per body: the
        stream relay reads a few times a turn, and a generator costs its frame, its close and a
        context manager around it (docs/EXPERIMENTS.md, "Gateway CPU, fourth pass")."""
        conn = self._conn
        if conn is None or self._done:
            return b""
        try:
            if self._chunked:
                # whatever arrived, decoded in one go: the events a worker sent together leave the
                # gateway in one write, and one read (one await, one timeout) serves them all
                while True:
                    data = await conn.read(65536, self._timeout)
                    if not data:
                        raise UpstreamError("the worker closed the connection mid-body")
                    payload = self._dechunked(data)
                    if payload is not None:
                        return payload
            if self._left is not None:
                if self._left == 0:
                    self._done = True
                    return b""
                data = await conn.read(min(self._left, 65536), self._timeout)
                if not data:
                    raise UpstreamError("the worker closed the connection mid-body")
                self._left -= len(data)
                if self._left == 0:
                    self._done = True
                return data
            # delimited by the connection's end
            self._keep_alive = False
            data = await conn.read(65536, self._timeout)
            if not data:
                self._done = True
            return data
        except TimeoutError as exc:  # before OSError, of which it is a subclass
            self.close()
            raise UpstreamError("the worker stopped sending (read timeout)") from exc
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            self.close()
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc

    def release(self) -> None:
        """Back to the pool when the body was read to its end, else closed."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self._pool._active[self._key].discard(conn)
        if self._done and self._keep_alive:
            self._pool._put(self._key, conn)
        else:
            conn.close()

    def _dechunked(self, data: bytes) -> bytes | None:
        """The payloads of the whole chunks `data` completes, None while it completes none and the body
        goes on; what is left undecoded stays on the response for the next read. ValueError on bad
        framing, or on a chunk over MAX_CHUNK_BYTES."""
        if self._undecoded:
            if len(self._undecoded) > MAX_CHUNK_BYTES:
                raise ValueError(f"a chunk of over {MAX_CHUNK_BYTES} bytes")
            buffer = self._undecoded + data
        else:
            buffer = data
        payloads, used, last = dechunk(buffer)
        self._undecoded = buffer[used:]
        if last:  # complete with these bytes: a caller may stop at their last event
            self._done = True
            if self._undecoded:  # bytes after the body: the connection's framing is lost
                self._keep_alive = False
        if payloads or last:
            return payloads[0] if len(payloads) == 1 else b"".join(payloads)
        return None

    def close(self) -> None:
        """Drop the connection: a worker sees its client go and aborts the request."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._pool._active[self._key].discard(conn)
            conn.close()


def dechunk(buffer: bytes) -> tuple[list[bytes], int, bool]:
    """The whole chunks at the start of a chunked body: (their payloads, the bytes they and their framing
    take, whether the last chunk and its trailers were among them). Raises ValueError on bad framing."""
    payloads: list[bytes] = []
    pos = 0
    while True:
        line_end = buffer.find(b"\r\n", pos)
        if line_end < 0:
            if len(buffer) - pos > MAX_HEADER_BYTES:
                raise ValueError("chunk size line too long")
            return payloads, pos, False
        size_text = buffer[pos:line_end].split(b";", 1)[0].strip()
        if not size_text or size_text.strip(_HEX_DIGITS):
            raise ValueError(f"bad chunk size {size_text[:20]!r}")
        size = int(size_text, 16)
        if size == 0:  # trailers, if any, up to the blank line
            if buffer.startswith(b"\r\n", line_end + 2):
                return payloads, line_end + 4, True
            end = buffer.find(b"\r\n\r\n", line_end + 2)
            if end < 0:
                if len(buffer) - line_end > MAX_HEADER_BYTES:
                    raise ValueError("chunked trailers too long")
                return payloads, pos, False
            return payloads, end + 4, True
        data_end = line_end + 2 + size
        if len(buffer) < data_end + 2:
            return payloads, pos, False
        if buffer[data_end : data_end + 2] != b"\r\n":
            raise ValueError("chunk not followed by CRLF")
        payloads.append(buffer[line_end + 2 : data_end])
        pos = data_end + 2


class UpstreamPool:
    def __init__(
        self,
        connect_timeout_s: float = 2.0,
        read_timeout_s: float = 120.0,
        first_byte_timeout_s: float = 20.0,
    ) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self.first_byte_timeout_s = first_byte_timeout_s  # the head of a streamed answer comes at once
        # the W3C trace context header lines of the call in progress (tracing on)
        self.trace_headers: Callable[[], str] | None = None
        self._idle: defaultdict[tuple[str, int], list[_Conn]] = defaultdict(list)
        self._active: defaultdict[tuple[str, int], set[_Conn]] = defaultdict(set)
        self._targets: dict[str, tuple[tuple[str, int], str]] = {}  # URL -> `_target(URL)`

    async def post(self, url: str, body: bytes, head_timeout_s: float | None = None) -> UpstreamResponse:
        """Send; the status and headers are read before returning (within `head_timeout_s`, default the
        read timeout). Raises UpstreamError."""
        key, request_line = self._target(url)
        head = (
            f"{request_line}content-length: {len(body)}\r\naccept: */*\r\n{self._trace_lines()}\r\n"
        ).encode("latin-1")
        while True:
            conn = self._take(key)
            reused = conn is not None
            if conn is None:
                conn = await self._open(key)
            active = self._active[key]
            active.add(conn)
            try:
                conn.writer.write(head + body if len(body) < 16384 else head)
                if len(body) >= 16384:
                    conn.writer.write(body)
                status, headers = await self._read_head(conn, head_timeout_s or self.read_timeout_s)
            except TimeoutError as exc:  # before OSError, of which it is a subclass
                active.discard(conn)
                conn.close()
                raise UpstreamError("the worker did not answer (read timeout)") from exc
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
                active.discard(conn)
                conn.close()
                if reused and not conn.aborted:
                    continue  # the worker closed an idle keep-alive connection: try a fresh one
                raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc
            except BaseException:
                active.discard(conn)
                conn.close()  # cancelled (the client left): the worker must see the hop close
                raise
            return UpstreamResponse(self, key, conn, status, headers, self.read_timeout_s)

    def _target(self, url: str) -> tuple[tuple[str, int], str]:
        """(host, port) and the head's first lines for `url`, parsed once per URL (a few workers' few
        paths; parsing costs ~3 us a request)."""
        target = self._targets.get(url)
        if target is None:
            parts = urlsplit(url)
            if parts.scheme != "http" or not parts.hostname:
                raise UpstreamError(f"unsupported worker URL {url!r} (plain http only)")
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            lines = f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\ncontent-type: application/json\r\n"
            if len(self._targets) >= MAX_TARGETS:
                self._targets.clear()
            target = self._targets[url] = ((parts.hostname, parts.port or 80), lines)
        return target

    def _trace_lines(self) -> str:
        return "" if self.trace_headers is None else self.trace_headers()

    async def _open(self, key: tuple[str, int]) -> _Conn:
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                reader, writer = await asyncio.open_connection(key[0], key[1], limit=MAX_HEADER_BYTES)
        except OSError as exc:  # refused, unreachable, or the connect timeout (a TimeoutError)
            raise UpstreamError(f"cannot connect to {key[0]}:{key[1]}: {exc!r}") from exc
        return _Conn(reader, writer)

    @staticmethod
    async def _read_head(conn: _Conn, timeout_s: float) -> tuple[int, dict[str, str]]:
        raw = await conn.readuntil(b"\r\n\r\n", timeout_s)
        lines = raw.decode("latin-1").split("\r\n")
        status_line = lines[0].split(" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith("HTTP/1."):
            raise ValueError(f"not an HTTP/1.x response: {lines[0][:80]!r}")
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        return int(status_line[1]), headers

    def _take(self, key: tuple[str, int]) -> _Conn | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if not conn.reader.at_eof() and not conn.writer.is_closing():
                conn.reused = True
                return conn
            conn.close()
        return None

    def _put(self, key: tuple[str, int], conn: _Conn) -> None:
        idle = self._idle[key]
        if len(idle) < MAX_IDLE_PER_HOST and not conn.reader.at_eof():
            idle.append(conn)
        else:
            conn.close()

    def abort(self, url: str) -> int:
        """A worker left the pool: close its idle connections, and those of answers the client has
        not started to receive, so that they fail now (and are retried elsewhere) instead of waiting
        on a worker that may never answer. Returns how many answers were aborted."""
        parts = urlsplit(url)
        key = (parts.hostname or "", parts.port or 80)
        for conn in self._idle.pop(key, []):
            conn.close()
        aborted = [conn for conn in self._active.get(key, ()) if not conn.committed]
        for conn in aborted:
            conn.aborted = True
            conn.close()
        return len(aborted)

    async def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
