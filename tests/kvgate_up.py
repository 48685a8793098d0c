"""`kvgate up` as a user runs it, for tests: one subprocess on a free port, waited for until its ready
banner, stopped with Ctrl-C (SIGINT) as a user stops it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from gateway.natsd import free_port

ROOT = Path(__file__).resolve().parents[1]
# generous for a loaded 2-core box; a `kvgate up` that is not up by then fails its test, not hangs it
READY_TIMEOUT_S = 120.0
# a live worker's heartbeat can lag a few seconds under load: not dropped for it (ARGS may override)
STALE = ["--worker-stale-after-s", "10"]


@contextlib.contextmanager
def running_kvgate_up(
    args: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> Iterator[str]:
    """`kvgate up ARGS --port FREE` until the block ends; yields the gateway's base URL."""
    port = free_port()
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "up", *STALE, *args, "--port", str(port)],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=log, start_new_session=True,
    )  # fmt: skip
    # its whole process group: the workers and NATS hold its stdout too, so only then does it close
    watchdog = threading.Timer(READY_TIMEOUT_S, _kill_group, (proc.pid,))
    watchdog.start()
    try:
        assert proc.stdout is not None
        while b"kvgate is up" not in (line := proc.stdout.readline()):
            assert line, f"kvgate up exited, or was not up in time: {log_path.read_text()[-3000:]}"
        watchdog.cancel()
        yield f"http://127.0.0.1:{port}"
    finally:
        watchdog.cancel()
        proc.send_signal(signal.SIGINT)  # Ctrl-C: kvgate up stops its workers and NATS
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
        log.close()


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def running_kvgate_up_async(
    args: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> AsyncIterator[str]:
    """`running_kvgate_up` for async tests: it starts and stops in a thread, so the event loop runs on."""
    up = running_kvgate_up(args, log_path, env, cwd)
    url = await asyncio.to_thread(up.__enter__)
    try:
        yield url
    finally:
        await asyncio.to_thread(up.__exit__, None, None, None)
