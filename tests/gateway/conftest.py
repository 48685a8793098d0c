"""Real processes for the gateway's end-to-end tests: workers (`kvgate worker`) and the gateway
(`kvgate gateway`), each a child process on a free loopback port, torn down after the test."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client as NATS

API_KEY = "test-key"
ANNOUNCE_TIMEOUT_S = 90.0  # a child's start (imports, model) on a loaded box


# A live worker's heartbeat (one a second) can lag a few seconds on a loaded 2-core CI box; the default 3 s
# would drop it mid-test. 10 s still drops a killed worker well within the tests' bounds (30 s and more).
WORKER_STALE_AFTER_S = "10"


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[NATS]:
    """A client connection to the test's nats-server, closed after the test."""
    conn = await nats.connect(nats_url)
    try:
        yield conn
    finally:
        await conn.close()


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """(status, parsed JSON or None); status 0 when nothing answers (refused, or silent for 30 s: a
    process busy on a loaded machine may take seconds to answer, and is not gone for it)."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30.0) as resp:
            status, body = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read()
    except OSError:
        return 0, None
    try:
        return status, json.loads(body)
    except ValueError:
        return status, None


class Proc:
    """A server process (`python -m MODULE ARGV...`, kvgate's CLI by default) logging to a file.

    `url` None: the process listens where the system put it (`--port 0`) and says so in its log
    (`announces`: a pattern whose group is the URL); read from there on first use."""

    def __init__(
        self,
        argv: list[str],
        url: str | None,
        log: Path,
        module: str = "gateway.cli",
        announces: re.Pattern[str] | None = None,
    ) -> None:
        self.argv = argv
        self._url = url
        self.announces = announces
        self.log = log
        self._log_file = log.open("ab")
        self._log_start = self._log_file.tell()  # a restart appends to its predecessor's log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *argv],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def url(self) -> str:
        if self._url is None:
            self._url = self._announced_url(ANNOUNCE_TIMEOUT_S)
        return self._url

    def _announced_url(self, timeout_s: float) -> str:
        assert self.announces is not None, "a Proc without a URL must say how it announces one"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.log.open("rb") as log:
                log.seek(self._log_start)
                found = self.announces.search(log.read().decode(errors="replace"))
            if found:
                return found.group(1)
            self.alive()
            time.sleep(0.05)
        raise TimeoutError(f"{self.argv[0]} did not say where it listens: {self.log.read_text()[-2000:]}")

    def alive(self) -> None:
        """RuntimeError with its log's end if the process has exited."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.argv[0]} exited: {self.log.read_text()[-2000:]}")

    def wait_http(self, path: str, timeout_s: float = 60.0, headers: dict[str, str] | None = None) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited: {self.log.read_text()[-2000:]}")
            if http_get(self.url + path, headers)[0] == 200:
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.url}{path} not ready: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log_file.close()


class Cluster:
    """Workers and a gateway on one NATS namespace."""

    def __init__(self, nats_url: str, namespace: str, tmp: Path) -> None:
        self.nats_url = nats_url
        self.namespace = namespace
        self.tmp = tmp
        self.workers: dict[str, Proc] = {}
        self.gateway: Proc | None = None

    def worker(self, worker_id: str, engine: str = "mock", *extra: str) -> Proc:
        # port 0: the worker binds the port the system gives it. A port picked here and bound later by
        # the child (seconds later on a loaded box) can be taken meanwhile, by this test's other worker
        # or another process; a child that then fails to bind leaves whoever holds the port answering
        # its health checks, and the gateway waiting for a worker that never registers
        argv = [
            "worker", "--engine", engine, "--nats", self.nats_url, "--port", "0",
            "--namespace", self.namespace, "--worker-id", worker_id, *extra,
        ]  # fmt: skip
        announces = re.compile(rf"kvgate worker {re.escape(worker_id)} ready on (\S+)")
        proc = Proc(argv, None, self.tmp / f"{worker_id}.log", announces=announces)
        self.workers[worker_id] = proc
        return proc

    def start_gateway(self, *extra: str) -> Proc:
        argv = [
            "gateway",
            "--nats",
            self.nats_url,
            "--port",
            "0",
            "--namespace",
            self.namespace,
            "--worker-stale-after-s",
            WORKER_STALE_AFTER_S,
            *extra,  # later flags win: a test may set its own staleness
        ]
        announces = re.compile(r"gateway listening on (\S+)")
        self.gateway = Proc(argv, None, self.tmp / "gateway.log", announces=announces)
        return self.gateway

    def ready(self, workers: int, timeout_s: float = 90.0) -> None:
        """Every worker healthy, and the gateway sees `workers` of them."""
        for proc in self.workers.values():
            proc.wait_http("/health", timeout_s)
        assert self.gateway is not None
        deadline = time.monotonic() + timeout_s
        while True:
            for proc in self.workers.values():  # one that died since says so, not "not seen" 90 s later
                proc.alive()
            self.gateway.wait_http("/ready", max(1.0, deadline - time.monotonic()))
            if http_get(self.gateway.url + "/ready")[1]["workers"] >= workers:
                return
            assert time.monotonic() < deadline, "gateway did not see the workers"
            time.sleep(0.1)

    def stop(self) -> None:
        for proc in [*self.workers.values(), *([self.gateway] if self.gateway else [])]:
            proc.stop()


@pytest.fixture
def cluster(nats_url: str, namespace: str, tmp_path: Path) -> Iterator[Cluster]:
    running = Cluster(nats_url, namespace, tmp_path)
    try:
        yield running
    finally:
        running.stop()
