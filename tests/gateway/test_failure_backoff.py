"""A worker that refuses connections is left out of the pick for a back-off: after it dies (kill -9,
still registered until its heartbeat lapses), one request pays a retry, the next ones go straight to
the live worker."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateway.conftest import Cluster, http_get

pytestmark = pytest.mark.slow


@pytest.fixture
def pair(nats_url: str, tmp_path: Path) -> Iterator[Cluster]:
    cluster = Cluster(nats_url, "t" + uuid.uuid4().hex[:10], tmp_path)
    try:
        for name in ("a", "b"):
            cluster.worker(name, "mock", "--speedup", "1000")
        cluster.start_gateway("--failure-backoff-s", "30", "--policy", "round_robin")
        cluster.ready(workers=2)
        yield cluster
    finally:
        cluster.stop()


def ask(url: str, stream: bool = False, path: str = "/v1/chat/completions") -> tuple[int, str]:
    """One turn through `path`: chat completions, or Anthropic's Messages (the same body fits both)."""
    messages = [{"role": "user", "content": "hello"}]
    body = {"model": "mock", "messages": messages, "max_tokens": 2, "stream": stream}
    request = urllib.request.Request(
        url + path, json.dumps(body).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        resp.read()
        return resp.status, resp.headers["x-kvgate-worker"]


def retries(url: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as resp:
        text = resp.read().decode()
    lines = [line for line in text.splitlines() if line.startswith("kvgate_retries_total")]
    return sum(float(line.split()[-1]) for line in lines)


def test_a_refusing_worker_costs_one_retry_not_one_per_request(pair: Cluster) -> None:
    assert pair.gateway is not None
    url = pair.gateway.url
    pair.workers["a"].kill()  # its registration outlives it for a few seconds
    answers = [ask(url) for _ in range(6)]  # round robin would send every other one to a
    assert answers == [(200, "b")] * 6
    assert retries(url) <= 1.0  # without the back-off: every other request (round robin) retried
    assert http_get(url + "/health")[0] == 200


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_a_hung_worker_costs_the_first_byte_timeout_then_is_left_out(
    nats_url: str, tmp_path: Path, path: str
) -> None:
    """SIGSTOP: the worker's socket still accepts, nothing answers. A streamed turn waits the first-byte
    timeout (1 s here, not the 120 s read timeout), then is retried on the live worker, whatever the
    API the client speaks."""
    cluster = Cluster(nats_url, "t" + uuid.uuid4().hex[:10], tmp_path)
    try:
        for name in ("a", "b"):
            cluster.worker(name, "mock", "--speedup", "1000")
        cluster.start_gateway(
            "--first-byte-timeout-s", "1", "--failure-backoff-s", "30", "--policy", "round_robin"
        )
        cluster.ready(workers=2)
        assert cluster.gateway is not None
        url = cluster.gateway.url
        os.kill(cluster.workers["a"].proc.pid, signal.SIGSTOP)
        started = time.monotonic()
        answers = [ask(url, stream=True, path=path) for _ in range(4)]
        elapsed = time.monotonic() - started
        assert answers == [(200, "b")] * 4
        assert retries(url) <= 1.0  # one first-byte timeout at most
        assert elapsed < 60  # the 1 s first-byte timeout, not the 120 s read timeout (room for load)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(cluster.workers["a"].proc.pid, signal.SIGCONT)
        cluster.stop()
