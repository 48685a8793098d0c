"""End to end: vLLM-wire events through the bridge steer the real gateway, and the bridge process
registers and deregisters itself."""

from __future__ import annotations

import asyncio
import contextlib
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

import nats
import openai
import pytest
import zmq.asyncio

from gateway.natsd import free_port
from router.chat import ByteTokenizer, encode_chat
from router.protocol import BlockRemoved, KvEventBatch, Subjects, decode
from tests.engines.bridge.conftest import registered, running_bridge
from tests.engines.bridge.engine_wire import WORKER, B, EnginePublisher, map_batch, stored
from tests.engines.vllm_events import VllmBlockRemoved
from tests.gateway.conftest import WORKER_STALE_AFTER_S, Proc, http_get
from tests.polling import until


def gateway_saw_events_of(gateway_url: str, worker_id: str) -> bool:
    with urllib.request.urlopen(gateway_url + "/metrics", timeout=2) as resp:
        text = resp.read().decode()
    return f'kvgate_worker_event_lag_seconds{{worker="{worker_id}"}}' in text


async def eventually(check: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """`until` for a blocking check (HTTP to a subprocess): each try runs in a thread."""
    await until(lambda: asyncio.to_thread(check), timeout_s, what)


@pytest.mark.slow
async def test_gateway_routes_on_bridged_engine_events(
    zctx: zmq.asyncio.Context, nats_url: str, namespace: str, tmp_path: Any
) -> None:
    model = "vllm-sim"
    # Two OpenAI-compatible servers that publish nothing themselves (kvgate mock workers without
    # --nats) stand in for vLLM's HTTP side; their KV events come from vLLM-wire publishers.
    servers: dict[str, Proc] = {}
    engines: dict[str, EnginePublisher] = {}
    for name in ("vllm-a", "vllm-b"):
        port = free_port()
        argv = ["worker", "--engine", "mock", "--port", str(port), "--model", model, "--worker-id", name]
        servers[name] = Proc(argv, f"http://127.0.0.1:{port}", tmp_path / f"{name}.log")
        engines[name] = EnginePublisher(zctx)
    port = free_port()
    stale = ["--worker-stale-after-s", WORKER_STALE_AFTER_S]
    gateway = Proc(
        ["gateway", "--nats", nats_url, "--port", str(port), "--namespace", namespace, *stale],
        f"http://127.0.0.1:{port}",
        tmp_path / "gateway.log",
    )
    messages = [
        {"role": "system", "content": "You are a careful coding agent. Use the tools. " * 8},
        {"role": "user", "content": "List the files in the repository."},
    ]
    tokens = encode_chat(messages, ByteTokenizer())
    k = len(tokens) // B - 1
    assert k >= 4
    client = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="unused", max_retries=0)

    async def route() -> tuple[str, int]:
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=messages, max_tokens=1, extra_headers={"x-session-id": uuid.uuid4().hex}
        )
        raw.parse()
        return raw.headers["x-kvgate-worker"], int(raw.headers["x-kvgate-cached-tokens-expected"])

    try:
        async with contextlib.AsyncExitStack() as stack:
            for name, server in servers.items():
                await asyncio.to_thread(server.wait_http, "/health", 60)
                bridge_kw = {"worker_id": name, "url": server.url, "model": model}
                await stack.enter_async_context(
                    running_bridge(engines[name], nats_url, namespace, replay=True, **bridge_kw)
                )
            await eventually(lambda: (http_get(gateway.url + "/ready")[1] or {}).get("workers") == 2, "ready")

            # Engine B caches the prompt's first k blocks: the gateway sends the turn there.
            await engines["vllm-b"].send(map_batch(stored(list(range(1, k + 1)), None, tokens[: k * B])))
            await eventually(lambda: gateway_saw_events_of(gateway.url, "vllm-b"), "B's events")
            assert await route() == ("vllm-b", k * B)

            # B evicts them (removals by vLLM's hashes), A caches them: the next turn goes to A.
            await engines["vllm-b"].send(map_batch(VllmBlockRemoved(list(range(1, k + 1)), "GPU")))
            nc = await nats.connect(nats_url)
            subjects = Subjects(namespace)

            async def b_removal_on_the_stream() -> bool:
                last = await nc.jetstream().get_last_msg(subjects.kv_stream, subjects.kv("vllm-b"))
                return isinstance(decode(last.data, KvEventBatch).events[-1], BlockRemoved)

            await until(b_removal_on_the_stream, 30.0, "B's removal on the KV stream")
            await nc.close()
            # The gateway reads the stream in order: B's removal is applied before A's store.
            await engines["vllm-a"].send(map_batch(stored(list(range(101, 101 + k)), None, tokens[: k * B])))
            await eventually(lambda: gateway_saw_events_of(gateway.url, "vllm-a"), "A's events")
            assert await route() == ("vllm-a", k * B)
    finally:
        await client.close()
        for proc in (gateway, *servers.values()):
            proc.stop()
        for engine_publisher in engines.values():
            await engine_publisher.close()


@pytest.mark.slow
async def test_bridge_process_registers_and_deregisters_on_sigterm(
    engine: EnginePublisher, nats_url: str, namespace: str, tmp_path: Any
) -> None:
    argv = [
        "bridge", "--zmq", engine.endpoint, "--replay", engine.replay_endpoint, "--url", "http://vllm-0:8000",
        "--model", "m", "--nats", nats_url, "--namespace", namespace, "--worker-id", WORKER,
        "--metrics-interval", "0",
    ]  # fmt: skip
    proc = Proc(argv, "http://unused", tmp_path / "bridge.log")
    nc = await nats.connect(nats_url)
    try:
        await engine.wait_subscribed()
        js = nc.jetstream()
        buckets: list[Any] = []

        async def bucket_made() -> bool:  # the bucket appears with the bridge's set-up
            with contextlib.suppress(nats.js.errors.BucketNotFoundError, nats.js.errors.NotFoundError):
                buckets.append(await js.key_value(Subjects(namespace).registry_bucket))
            return bool(buckets)

        await until(bucket_made, 60.0, "the registry bucket")
        kv = buckets[0]
        registration = await registered(kv, WORKER)
        assert (registration.url, registration.engine) == ("http://vllm-0:8000", "vllm")
        proc.proc.terminate()
        assert await asyncio.to_thread(proc.proc.wait, 15) == 0
        with pytest.raises(nats.js.errors.KeyNotFoundError):
            await kv.get(WORKER)
    finally:
        proc.stop()
        await nc.close()
