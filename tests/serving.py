"""An aiohttp application served on 127.0.0.1 for the length of a block, for tests that need a real
HTTP peer (a worker's stand-in, an OTLP receiver, an engine's /health)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from gateway.natsd import free_port


@contextlib.asynccontextmanager
async def serving(app: web.Application, port: int | None = None, **runner_options: Any) -> AsyncIterator[str]:
    """`app` on `port` (a free one by default) until the block ends; yields its base URL.
    `runner_options` go to `web.AppRunner` (e.g. `keepalive_timeout`, `handler_cancellation`)."""
    runner = web.AppRunner(app, **runner_options)
    await runner.setup()
    port = free_port() if port is None else port
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
