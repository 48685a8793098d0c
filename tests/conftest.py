"""Shared fixtures: a real nats-server per test session, and a fresh namespace per test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from gateway.natsd import NatsServer


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    with NatsServer() as server:
        yield server


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    if not nats_server.running:  # a test that stopped it must not break the next one
        nats_server.start()
    return nats_server.url


@pytest.fixture
def namespace() -> str:
    """Subjects, streams and buckets of one test never meet another's."""
    return "t" + uuid.uuid4().hex[:10]
