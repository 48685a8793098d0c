"""Tenants through a real `kvgate gateway` and mock worker: key B never sees that key A cached a prompt
(neither the worker's `cached_tokens` nor the gateway's expectation) nor joins A's session through a
shared id; two keys named as one tenant share; /metrics and /ready take their own keys."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

from gateway.natsd import NatsServer
from gateway.tenants import Tenants, namespaced, public, salt
from tests.gateway.conftest import Cluster, http_get

pytestmark = pytest.mark.slow

KEY_A, KEY_B, KEY_C1, KEY_C2 = "key-a", "key-b", "key-c1", "key-c2"
PROMPT = "You are a careful assistant. " * 40  # ~1,200 bytes: 75 blocks of 16 byte tokens


@pytest.fixture(scope="module")
def gateway(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if not nats_server.running:
        nats_server.start()
    cluster = Cluster(nats_server.url, "t" + uuid.uuid4().hex[:10], tmp_path_factory.mktemp("tenants"))
    try:
        cluster.worker("w0", "mock", "--speedup", "1000")
        cluster.start_gateway(
            "--api-key", KEY_A, "--api-key", KEY_B, "--tenant", f"c={KEY_C1}", "--tenant", f"c={KEY_C2}",
            "--metrics-key", "ops", "--ready-key", "ops",
        )  # fmt: skip
        for proc in cluster.workers.values():
            proc.wait_http("/health")
        wait_ready(cluster.gateway.url)  # cluster.ready() reads /ready without the key
        yield cluster.gateway.url
    finally:
        cluster.stop()


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + 60
    while http_get(url + "/ready", {"authorization": "Bearer ops"})[0] != 200:
        assert time.monotonic() < deadline, "gateway not ready"
        time.sleep(0.1)


def ask(
    url: str, key: str, session: str | None = None, parent: str | None = None
) -> tuple[int, dict[str, str], dict]:
    headers = {"content-type": "application/json", "authorization": f"Bearer {key}"}
    if session is not None:
        headers["x-session-id"] = session
    if parent is not None:
        headers["x-parent-session-id"] = parent
    body = {"model": "mock", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 2}
    request = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def cached(answer: dict) -> int:
    return answer["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)


def test_another_key_never_sees_a_cached_prompt_or_a_session(gateway: str) -> None:
    status, _, _ = ask(gateway, KEY_A, "shared")
    assert status == 200
    status, headers, answer = ask(gateway, KEY_A, "shared")  # A again: its own cache
    assert status == 200 and cached(answer) > 1000
    assert int(headers["x-kvgate-cached-tokens-expected"]) > 1000
    assert headers["x-kvgate-session"] == "shared"  # echoed as the client knows it
    # B's first turn of the same prompt: nothing cached for it, and not recognised as A's session
    status, headers, answer = ask(gateway, KEY_B)
    assert status == 200
    assert cached(answer) == 0 and headers["x-kvgate-cached-tokens-expected"] == "0"
    assert headers["x-kvgate-session"].startswith("inferred-")
    # the prompt of A's session "shared", sent by C under the same id: a session of C's own
    status, headers, answer = ask(gateway, KEY_C1, "shared")
    assert status == 200 and cached(answer) == 0 and headers["x-kvgate-cached-tokens-expected"] == "0"


def test_keys_named_as_one_tenant_share_its_cache(gateway: str) -> None:
    assert ask(gateway, KEY_C1, "c-session")[0] == 200
    status, headers, answer = ask(gateway, KEY_C2, "c-session")
    assert status == 200 and cached(answer) > 1000
    assert int(headers["x-kvgate-cached-tokens-expected"]) > 1000


def parent_picks(url: str) -> float:
    """Picks that went to a sub-agent's parent's worker, from /metrics."""
    request = urllib.request.Request(url + "/metrics", headers={"authorization": "Bearer ops"})
    with urllib.request.urlopen(request, timeout=30) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith("kvgate_routing_decisions_total{") and 'reason="parent"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_sub_agent_finds_its_parent_within_its_tenant(gateway: str) -> None:
    assert ask(gateway, KEY_A, "lead")[0] == 200
    before = parent_picks(gateway)
    # the sub-agent names its parent as its client knows it: the tenant's own session "lead"
    assert ask(gateway, KEY_A, "lead-sub1", parent="lead")[0] == 200
    assert parent_picks(gateway) == before + 1


def test_metrics_and_ready_take_their_own_key(gateway: str) -> None:
    for path in ("/metrics", "/ready"):
        assert http_get(gateway + path)[0] == 401
        assert http_get(gateway + path, {"authorization": f"Bearer {KEY_A}"})[0] == 401
        assert http_get(gateway + path, {"authorization": "Bearer ops"})[0] == 200
    assert http_get(gateway + "/health")[0] == 200  # liveness stays open


def test_tenant_ids_and_salts_never_carry_the_key() -> None:
    tenants = Tenants([KEY_A], [("c", KEY_C1), ("c", KEY_C2)])
    a = tenants.of({"authorization": f"Bearer {KEY_A}"})
    c1, c2 = tenants.of({"x-api-key": KEY_C1}), tenants.of({"authorization": f"Bearer {KEY_C2}"})
    assert a and c1 == c2 and a != c1 and KEY_A not in a
    assert tenants.of({"authorization": "Bearer nope"}) is None
    assert len(salt(a, "x" * 1000)) < 256 and salt(a, None) == a
    assert public(namespaced(a, "abc") or "") == "abc" and public("inferred-12") == "inferred-12"
