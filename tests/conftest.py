"""Shared fixtures: a real nats-server per test session, and a fresh namespace per test."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import nats
import pytest
from nats.js import JetStreamContext

from gateway.natsd import NatsServer

T = TypeVar("T")


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    with NatsServer() as server:
        yield server


@pytest.fixture
def nats_url(nats_server: NatsServer) -> Iterator[str]:
    if not nats_server.running:  # a test that stopped it must not break the next one
        nats_server.start()
    before = _on_server(nats_server.url, _stream_names)
    yield nats_server.url
    if nats_server.running:
        _on_server(nats_server.url, lambda js: _delete_streams(js, keep=before))


async def _stream_names(js: JetStreamContext) -> set[str]:
    return {info.config.name for info in await js.streams_info() if info.config.name}


async def _delete_streams(js: JetStreamContext, keep: set[str]) -> None:
    """Delete the JetStream streams (KV buckets included) the test made: each reserves its max_bytes of
    the server's store, and a session's worth of them exhausts it ("insufficient storage"). Those made
    before it stay: a module's running cluster (tests/gateway/test_app.py's `pool`) still uses them."""
    for name in await _stream_names(js) - keep:
        await js.delete_stream(name)


def _on_server(url: str, action: Callable[[JetStreamContext], Awaitable[T]]) -> T:
    """Run `action` on a JetStream connection of its own, in a thread of its own: an async test's event
    loop may still be set on this one."""

    async def connected() -> T:
        nc = await nats.connect(url, connect_timeout=10, max_reconnect_attempts=0)
        try:
            return await action(nc.jetstream(timeout=30))
        finally:
            await nc.close()

    results: list[T] = []
    failures: list[BaseException] = []

    def run() -> None:
        try:
            results.append(asyncio.run(connected()))
        except Exception as error:  # handed to the test's thread below
            failures.append(error)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if failures:
        raise failures[0]
    return results[0]


@pytest.fixture
def namespace() -> str:
    """Subjects, streams and buckets of one test never meet another's."""
    return "t" + uuid.uuid4().hex[:10]
