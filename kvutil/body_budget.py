"""Request bodies being read at once, bounded in bytes and in time.

aiohttp bounds one body (`client_max_size`) but not how many are read at once: 4,096 clients each
sending a 16 MiB body would make a server hold 64 GiB. Until a handler reads it, a body waits in the
socket under flow control (aiohttp buffers ~128 KiB of it), so the budget is taken before the read:
each body reserves its declared length (the per-body cap when it declares none) and a body that would
pass the total is refused with a 503 at once, before a byte of it is held. A body must also arrive
within a deadline: a client trickling it would otherwise hold its reservation for as long as it likes.
"""

from __future__ import annotations

import asyncio

from aiohttp import web


class BodyRefused(Exception):
    """A body not read: `status` and `message` for the server's own error format."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class BodyBudget:
    def __init__(self, max_total_bytes: int, max_body_bytes: int, timeout_s: float) -> None:
        if max_total_bytes < max_body_bytes:
            raise ValueError(
                f"the bodies' total ({max_total_bytes} bytes) must hold one body ({max_body_bytes} bytes)"
            )
        self.max_total_bytes = max_total_bytes
        self.max_body_bytes = max_body_bytes
        self.timeout_s = timeout_s
        self.reserved = 0  # bytes reserved by the bodies being read now

    async def read(self, request: web.BaseRequest) -> bytes:
        """The whole body. Raises BodyRefused (503 over the budget, 408 past the deadline);
        aiohttp's HTTPRequestEntityTooLarge for one over the per-body cap."""
        declared = request.content_length
        size = self.max_body_bytes if declared is None else min(declared, self.max_body_bytes)
        if self.reserved + size > self.max_total_bytes:
            raise BodyRefused(503, "the server is reading too many request bodies at once; retry later")
        self.reserved += size
        try:
            if request.content.is_eof():  # it came whole with its head (most do): no deadline to arm
                return await request.read()
            async with asyncio.timeout(self.timeout_s):
                return await request.read()
        except TimeoutError as exc:
            raise BodyRefused(408, f"the request body did not arrive within {self.timeout_s:g} s") from exc
        finally:
            self.reserved -= size
