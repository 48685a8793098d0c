"""A client that sends a request's head and only part of its body, over a raw socket: what a slow or
hostile client does to a server that reads whole bodies."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit


class SlowBody:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, url: str, path: str, declared: int | None, first: bytes = b"{") -> SlowBody:
        """POST `path` declaring `declared` body bytes (None: chunked), of which `first` is sent."""
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        length = "transfer-encoding: chunked" if declared is None else f"content-length: {declared}"
        head = f"POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n{length}\r\n\r\n"
        body = first if declared is not None else b"%x\r\n%s\r\n" % (len(first), first)
        writer.write(head.encode() + body)
        await writer.drain()
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def status(self, timeout_s: float = 30.0) -> int:
        """The status of the server's answer (its head read, the rest left)."""
        line = await asyncio.wait_for(self.reader.readline(), timeout_s)
        return int(line.split()[1])

    async def answer(self, timeout_s: float = 30.0) -> tuple[int, bytes]:
        """The status and the body of a whole answer sent with a content-length."""
        status = await self.status(timeout_s)
        length = 0
        while (line := await asyncio.wait_for(self.reader.readline(), timeout_s)) not in (b"\r\n", b""):
            name, _, value = line.decode().partition(":")
            if name.strip().lower() == "content-length":
                length = int(value)
        return status, await asyncio.wait_for(self.reader.readexactly(length), timeout_s)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()
