"""A worker that fails is left out of the pick for a back-off: after it dies (kill -9, still registered
until its heartbeat lapses) or while it hangs (accepts, never answers), one request pays a retry, the
next ones go straight to the live worker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from router.protocol import Subjects, WorkerRegistration, encode
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


class HungWorker:
    """A worker that registers and keeps its heartbeat, accepts connections and never answers: a wedged
    engine as the gateway sees it. (A real worker stopped with SIGSTOP stops its heartbeat too, and the
    gateway drops it for that within seconds, whatever its first-byte timeout.)"""

    def __init__(self, nats_url: str, namespace: str, worker_id: str) -> None:
        self.nats_url, self.namespace, self.worker_id = nats_url, namespace, worker_id
        self._held: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> HungWorker:
        self._server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        self._nc = await nats.connect(self.nats_url)
        kv = await self._nc.jetstream().key_value(Subjects(self.namespace).registry_bucket)
        self._beat = asyncio.create_task(self._heartbeat(kv, url))
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._beat
        await self._nc.close()
        for writer in self._held:
            writer.close()
        self._server.close()
        await self._server.wait_closed()

    async def _hold(self, _reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._held.append(writer)  # read nothing, answer nothing, close nothing

    async def _heartbeat(self, kv: Any, url: str) -> None:
        while True:
            entry = WorkerRegistration(
                worker_id=self.worker_id, url=url, model="mock", block_size=16, num_blocks=256,
                engine="mock", epoch=1, heartbeat_ts=time.time(), publishes_events=False,
            )  # fmt: skip
            await kv.put(self.worker_id, encode(entry))
            await asyncio.sleep(0.5)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_a_hung_worker_costs_the_first_byte_timeout_then_is_left_out(
    nats_url: str, tmp_path: Path, path: str
) -> None:
    """A worker that accepts and never answers, its heartbeat alive: a streamed turn sent to it waits the
    first-byte timeout (1 s here, not the 120 s read timeout), then is retried on the live worker,
    whatever the API the client speaks; the hung worker is then left out of the pick."""
    cluster = Cluster(nats_url, "t" + uuid.uuid4().hex[:10], tmp_path)
    try:
        cluster.worker("b", "mock", "--speedup", "1000")
        cluster.start_gateway(
            "--first-byte-timeout-s", "1", "--failure-backoff-s", "60", "--policy", "round_robin"
        )
        cluster.ready(workers=1)
        assert cluster.gateway is not None
        url = cluster.gateway.url
        async with HungWorker(nats_url, cluster.namespace, "a"):
            await asyncio.to_thread(cluster.ready, 2)
            answers = [await asyncio.to_thread(ask, url, True, path) for _ in range(4)]
            assert answers == [(200, "b")] * 4  # each within urlopen's 30 s: no 120 s read timeout
            assert retries(url) == 1.0  # round robin sent one to a, once; then a was left out
    finally:
        cluster.stop()
