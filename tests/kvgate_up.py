"""`kvgate up` as a user runs it, for tests: one subprocess on a free port, waited for until its ready
banner, stopped with Ctrl-C (SIGINT) as a user stops it."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from gateway.natsd import free_port

ROOT = Path(__file__).resolve().parents[1]


@contextlib.contextmanager
def running_kvgate_up(
    args: list[str], log_path: Path, env: dict[str, str] | None = None, cwd: Path = ROOT
) -> Iterator[str]:
    """`kvgate up ARGS --port FREE` until the block ends; yields the gateway's base URL."""
    port = free_port()
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "up", *args, "--port", str(port)],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=log, start_new_session=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        while b"kvgate is up" not in (line := proc.stdout.readline()):
            assert line, f"kvgate up exited: {log_path.read_text()[-3000:]}"
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: kvgate up stops its workers and NATS
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
