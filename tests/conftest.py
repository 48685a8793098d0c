"""Shared fixtures: a real nats-server per test session, and a fresh namespace per test."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator

import nats
import pytest

from gateway.natsd import NatsServer


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    with NatsServer() as server:
        yield server


@pytest.fixture
def nats_url(nats_server: NatsServer) -> Iterator[str]:
    if not nats_server.running:  # a test that stopped it must not break the next one
        nats_server.start()
    yield nats_server.url
    if nats_server.running:
        _delete_streams(nats_server.url)


def _delete_streams(url: str) -> None:
    """Delete every JetStream stream (KV buckets included) the test left: each reserves its max_bytes
    of the server's store, and a session's worth of them exhausts it ("insufficient storage")."""

    async def delete_all() -> None:
        nc = await nats.connect(url, connect_timeout=10, max_reconnect_attempts=0)
        try:
            js = nc.jetstream(timeout=30)
            for info in await js.streams_info():
                await js.delete_stream(info.config.name)
        finally:
            await nc.close()

    failures: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(delete_all())
        except Exception as error:  # handed to the test's thread below
            failures.append(error)

    # a thread of its own: an async test's event loop may still be set on this one
    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if failures:
        raise failures[0]


@pytest.fixture
def namespace() -> str:
    """Subjects, streams and buckets of one test never meet another's."""
    return "t" + uuid.uuid4().hex[:10]
