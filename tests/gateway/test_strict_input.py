"""Hostile input against a real `kvgate gateway` (a real nats-server and a mock worker, each its own
process): every probe gets an OpenAI-style JSON 4xx (431 for headers), counted in the metrics, and a
slow client is cut off at the header deadline. Then a hypothesis fuzzer sends a few thousand bodies:
no 5xx, no hang, no connection dropped without an answer."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import socket
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.natsd import NatsServer
from tests.gateway.conftest import Cluster, http_get

T = TypeVar("T")

pytestmark = pytest.mark.slow

CONTEXT_BLOCKS = 64  # the worker's context: 64 blocks of 16 = 1,024 tokens


@pytest.fixture(scope="module")
def gateway(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not nats_server.running:
        nats_server.start()
    cluster = Cluster(nats_server.url, "t" + uuid.uuid4().hex[:10], tmp_path_factory.mktemp("strict"))
    try:
        cluster.worker("w0", "mock", "--speedup", "1000", "--num-blocks", str(CONTEXT_BLOCKS))
        # a header deadline of 10 s (the default): at 2 s, a fuzzing client starved between opening a
        # fresh connection and writing its body (its thread shares the GIL with hypothesis) was cut off
        cluster.start_gateway("--header-timeout-s", "10")
        cluster.ready(workers=1)
        assert cluster.gateway is not None
        yield cluster.gateway.url
    finally:
        cluster.stop()


def chat(content: str = "hi", **fields: object) -> dict[str, object]:
    return {"model": "mock", "messages": [{"role": "user", "content": content}], "max_tokens": 4, **fields}


def deep(depth: int) -> str:
    head = '{"model":"mock","messages":[{"role":"user","content":"x"}],"metadata":'
    return head + "[" * depth + "]" * depth + "}"


Body = bytes | str | dict[str, object]
CHAT, COMPLETE = "/v1/chat/completions", "/v1/completions"
PROBES: list[tuple[str, str, Body, dict[str, str], int]] = [
    # (name, path, body, headers, expected status)
    ("control char in user", CHAT, chat(user="abc\u0004"), {}, 400),
    ("control char in metadata.session_id", CHAT, chat(metadata={"session_id": "a\x07"}), {}, 400),
    ("control char in prompt_cache_key", CHAT, chat(prompt_cache_key="k\x1b[0m"), {}, 400),
    ("JSON nested 5,000 deep", CHAT, deep(5_000), {}, 400),
    ("JSON nested 100,000 deep", CHAT, deep(100_000), {}, 400),
    ("token id 2^32", COMPLETE, {"model": "mock", "prompt": [1, 2, 1 << 32], "max_tokens": 1}, {}, 400),
    ("token id 2^64", COMPLETE, {"model": "mock", "prompt": [1 << 64], "max_tokens": 1}, {}, 400),
    ("max_tokens 10^30", CHAT, chat(max_tokens=10**30), {}, 400),
    ("prompt + max_tokens over the context", CHAT, chat(max_tokens=1_020), {}, 400),
    ("metadata value not a string", CHAT, chat(metadata={"k": {"a": 1}}), {}, 400),
    ("user too long", CHAT, chat(user="u" * 1000), {}, 400),
    ("tools not function objects", CHAT, chat(tools=[1, 2]), {}, 400),
    ("tool_calls not a list", CHAT,
     {"model": "mock", "messages": [{"role": "assistant", "content": "", "tool_calls": "x"}]}, {}, 400),
    ("unicode session id (echoed encoded)", CHAT, chat(user="josé-🙂"), {}, 200),
]  # fmt: skip


def send(url: str, path: str, body: Body, headers: dict[str, str]) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else (body if isinstance(body, str) else json.dumps(body)).encode()
    return asyncio.run(_post(url + path, data, headers))


async def _post(url: str, data: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    headers = {"content-type": "application/json", **headers}
    async with aiohttp.ClientSession() as http, http.post(url, data=data, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


def requests_counted(url: str) -> float:
    text = aiohttp_get_text(url + "/metrics")
    lines = [line for line in text.splitlines() if line.startswith("kvgate_requests_total{")]
    counts = [line.rsplit(" ", 1)[1] for line in lines]
    return sum(map(float, counts))


def aiohttp_get_text(url: str) -> str:
    async def get() -> str:
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            return await resp.text()

    return asyncio.run(get())


@pytest.mark.parametrize(("name", "path", "body", "headers", "status"), PROBES, ids=[p[0] for p in PROBES])
def test_probe_gets_its_documented_status_as_openai_json(
    gateway: str, name: str, path: str, body: Body, headers: dict[str, str], status: int
) -> None:
    before = requests_counted(gateway)
    got, answer = send(gateway, path, body, headers)
    assert got == status, answer
    if status >= 400:
        assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert requests_counted(gateway) == before + 1  # every answer, refusals included, is counted


def test_oversized_headers_get_431_json(gateway: str) -> None:
    status, answer = send(gateway, "/v1/chat/completions", chat(), {"x-big": "a" * 20_000})
    assert status == 431 and answer["error"]["code"] == "header_too_large"
    assert 'kvgate_requests_total{endpoint="other",status="431"}' in aiohttp_get_text(gateway + "/metrics")


def test_a_slowloris_connection_is_closed_at_the_header_deadline(gateway: str) -> None:
    host, port = urlsplit(gateway).hostname, urlsplit(gateway).port
    with socket.create_connection((host, port)) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        started = time.monotonic()
        sock.settimeout(30)
        try:
            while time.monotonic() - started < 30:
                sock.sendall(b"x-slow: 1\r\n")  # a header line now and then, never the blank line
                time.sleep(0.5)
            closed_after = None
        except OSError:
            closed_after = time.monotonic() - started
    # The deadline is 10 s (plus the send that noticed); without it the connection would stay open for
    # as long as lines come. 30 s leaves a loaded machine's gateway room to act on its timer.
    assert closed_after is not None and closed_after < 30


# --- fuzzing

JSON_LEAF = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text()
JSON = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
TEXT = st.text(max_size=40)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool"]) | JSON, "content": TEXT | JSON},
    optional={"tool_calls": JSON, "name": JSON},
)
PLAUSIBLE = {  # values of the right type and often of the right range
    "max_tokens": st.integers(-2, 2_000),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
    "user": TEXT,
    "metadata": st.dictionaries(st.text(max_size=70), st.text(max_size=30), max_size=3),
    "temperature": st.floats(-1, 3),
    "stop": TEXT | st.lists(TEXT, max_size=5),
    "cache_salt": TEXT,
    "prompt_cache_key": TEXT,
}
CHAT = st.fixed_dictionaries(
    {"model": st.just("mock"), "messages": st.lists(MESSAGE, min_size=1, max_size=3)}, optional=PLAUSIBLE
)
COMPLETION = st.fixed_dictionaries(
    {"model": st.just("mock"), "prompt": TEXT | st.lists(st.integers(-5, 2**33), max_size=5)},
    optional=PLAUSIBLE,
)
ANYTHING = st.fixed_dictionaries(  # any JSON in every field
    {"model": st.just("mock") | JSON},
    optional={name: JSON for name in ["messages", "prompt", *PLAUSIBLE, "tools", "n"]},
)
BODY = CHAT | COMPLETION | ANYTHING | JSON


FUZZ_BODIES = 2_500
FUZZ_CONCURRENCY = 16


class Sender:
    """Sends bodies from a loop in a thread, FUZZ_CONCURRENCY at a time, while hypothesis draws more."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.pooled = self._call(self._session(pooled=True))
        self.fresh = self._call(self._session(pooled=False))
        self.limit = asyncio.Semaphore(FUZZ_CONCURRENCY)
        self.sent: list[concurrent.futures.Future[tuple[int, object]]] = []
        self.retried = 0

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    async def _session(self, *, pooled: bool) -> aiohttp.ClientSession:
        # A pooled connection idle for the gateway's whole keep-alive (10 s here) may be closed by the
        # gateway just as it is reused: drop idle connections well before. The other: one per request.
        if pooled:
            connector = aiohttp.TCPConnector(keepalive_timeout=0.5)
        else:
            connector = aiohttp.TCPConnector(force_close=True)
        return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60))

    def send(self, path: str, body: object) -> None:
        self.sent.append(asyncio.run_coroutine_threadsafe(self._one(path, body), self.loop))

    async def _one(self, path: str, body: object) -> tuple[int, object]:
        data = json.dumps(body).encode()
        async with self.limit:
            try:
                return await self._post(self.pooled, path, data), body
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                # On a starved machine this client can read a response long after the gateway sent
                # it, so a connection it holds idle for 0.5 s may have been idle at the gateway for
                # its 10 s and be closed as the next request goes out. HTTP clients send such a request
                # again on a new connection; a body that makes the gateway drop its connection drops
                # that one too, and fails the test.
                self.retried += 1
                return await self._post(self.fresh, path, data), body

    async def _post(self, http: aiohttp.ClientSession, path: str, data: bytes) -> int:
        async with http.post(self.url + path, data=data) as resp:
            await resp.read()  # a dropped connection raises here; a hang hits the timeout
            return resp.status

    def results(self) -> list[tuple[int, object]]:
        try:
            return [future.result(timeout=120) for future in self.sent]
        finally:
            self._call(self.pooled.close())
            self._call(self.fresh.close())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)


def test_fuzzed_bodies_never_get_a_5xx_a_hang_or_a_dropped_connection(gateway: str) -> None:
    sender = Sender(gateway)

    @settings(max_examples=FUZZ_BODIES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.sampled_from(["/v1/chat/completions", "/v1/completions"]), BODY)
    def fuzz(path: str, body: object) -> None:
        sender.send(path, body)

    fuzz()
    results = sender.results()  # raises on a dropped connection or a timeout
    statuses = collections.Counter(status for status, _ in results)
    print("fuzzed statuses:", dict(sorted(statuses.items())), "sent again:", sender.retried)
    assert len(results) >= FUZZ_BODIES * 0.9  # hypothesis may stop early once it runs out of new bodies
    assert not [(status, body) for status, body in results if status >= 500]
    assert statuses[200] > 0 and sum(n for s, n in statuses.items() if 400 <= s < 500) > 0
    assert http_get(gateway + "/health")[0] == 200
