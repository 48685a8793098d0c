"""Fixtures of the loadgen tests: an in-process SSE server, and `kvgate loadgen` as a real process."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from tests.loadgen.sse_server import SseServer
from tests.serving import serving

ROOT = Path(__file__).resolve().parents[2]
TRACES = ROOT / "traces"  # the samples the repository ships


class Served:
    def __init__(self, server: SseServer, url: str) -> None:
        self.server = server
        self.url = url


@pytest.fixture
async def sse() -> AsyncIterator[Served]:
    server = SseServer()
    async with serving(server.app, access_log=None) as url:
        yield Served(server, url)


class LoadgenRun:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr

    def summary(self) -> dict[str, Any]:
        return json.loads(self.stdout[self.stdout.index("{") :])


async def run_loadgen(args: Sequence[str], timeout: float = 120.0) -> LoadgenRun:
    """`kvgate loadgen ARGS` in a child process, while this test's event loop keeps serving."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.cli",
        "loadgen",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return LoadgenRun(proc.returncode or 0, out.decode(), err.decode())
