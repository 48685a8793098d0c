"""A TCP proxy in front of nats-server that makes one client's way to the server slow at the worst
moment: what the client sends from a given subscription on waits in the proxy until the test releases
it, or until `hold_s` after the client asked the server for an answer (a request or a PING; no answer
comes without the server reading what was held, so a client that waits for one is held up, never
wrong). The order of the bytes is kept, as TCP keeps it; only their arrival is late. A client that
takes its subscription to be on the server before an answer has said so is wrong here every time, not
one run in ten."""

from __future__ import annotations

import asyncio
import contextlib

ASKS = (b"PING\r\n", b" _INBOX.")  # a PING, or a PUB naming a reply subject: the client waits on it


class HoldingProxy:
    def __init__(self, server_host: str, server_port: int, subject: str, hold_s: float = 3.0) -> None:
        """Holds from the client's `SUB <subject> ...` on."""
        self.server = (server_host, server_port)
        self.marker = f"SUB {subject} ".encode()
        self.hold_s = hold_s
        self.held = bytearray()
        self.holding = False
        self.released = False  # the hold is over: everything passes
        self._asked = False
        self._upstream: asyncio.StreamWriter | None = None
        self._listener: asyncio.Server | None = None
        self._pumps: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._listener = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port = self._listener.sockets[0].getsockname()[1]
        return f"nats://127.0.0.1:{port}"

    def release(self) -> None:
        """Let the held bytes go on to the server, and everything after them."""
        if not self.released and self._upstream is not None:
            self._upstream.write(bytes(self.held))
        self.held.clear()
        self.holding = False
        self.released = True

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
        for pump in list(self._pumps):
            pump.cancel()
        for pump in list(self._pumps):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await pump
        if self._upstream is not None:
            self._upstream.close()

    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(*self.server)
        self._upstream = server_writer  # one client: the worker under test
        for pump in (
            self._to_server(client_reader, server_writer),
            self._to_client(server_reader, client_writer),
        ):
            task = asyncio.get_running_loop().create_task(pump)
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _to_server(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            self._forward(data, writer)
            await writer.drain()
        writer.close()

    def _forward(self, data: bytes, writer: asyncio.StreamWriter) -> None:
        if not self.holding and not self.released and self.marker in data:
            self.holding = True
        if not self.holding:
            writer.write(data)
            return
        self.held += data
        since_marker = self.held[self.held.find(self.marker) :]
        if not self._asked and any(ask in since_marker for ask in ASKS):
            self._asked = True
            asyncio.get_running_loop().call_later(self.hold_s, self.release)

    async def _to_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()
