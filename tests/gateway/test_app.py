"""The gateway end to end with the official `openai` client: a real nats-server, two mock workers and
`kvgate gateway`, each its own process (shared by this module's tests; the failure test has its own)."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import nats
import openai
import pytest

from gateway.app import Gateway, GatewayConfig
from gateway.middleware import AgentSession, bind_session
from gateway.natsd import NatsServer
from gateway.tenants import public
from router.config import RouterConfig
from router.protocol import PinHint, Subjects, WorkerRegistration, decode
from tests.gateway.conftest import API_KEY, Cluster, http_get

pytestmark = pytest.mark.slow

MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def pool(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not nats_server.running:
        nats_server.start()
    cluster = Cluster(nats_server.url, "t" + uuid.uuid4().hex[:10], tmp_path_factory.mktemp("pool"))
    try:
        for i in range(2):
            cluster.worker(f"m{i}", "mock", "--speedup", "1000")
        cluster.start_gateway("--api-key", API_KEY, "--max-body-bytes", str(MAX_BODY))
        cluster.ready(workers=2)
        yield cluster
    finally:
        cluster.stop()


def model_of(pool: Cluster) -> str:
    return http_get(pool.gateway.url + "/v1/models", {"authorization": f"Bearer {API_KEY}"})[1]["data"][0][
        "id"
    ]


def client(pool: Cluster) -> openai.OpenAI:
    return openai.OpenAI(base_url=pool.gateway.url + "/v1", api_key=API_KEY, max_retries=0)


def post(pool: Cluster, path: str, data: bytes, key: str = API_KEY) -> tuple[int, dict]:
    request = urllib.request.Request(
        pool.gateway.url + path,
        data=data,
        headers={"content-type": "application/json", "authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_chat_sync_stream_and_not_with_routing_headers(pool: Cluster) -> None:
    model = model_of(pool)
    sdk = bind_session(client(pool), "sync-session")
    messages = [{"role": "user", "content": "hello there, gateway"}]
    raw = sdk.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=5)
    reply = raw.parse()
    assert raw.headers["x-kvgate-worker"] in pool.workers
    assert raw.headers["x-kvgate-session"] == "sync-session"
    assert int(raw.headers["x-kvgate-cached-tokens-expected"]) >= 0
    assert reply.choices[0].message.content and reply.usage.completion_tokens == 5
    # without include_usage the client gets no usage chunk, though the gateway asked the worker for one
    chunks = list(sdk.chat.completions.create(model=model, messages=messages, max_tokens=5, stream=True))
    assert chunks and all(c.choices for c in chunks) and all(c.usage is None for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "length"
    chunks = list(
        sdk.chat.completions.create(
            model=model, messages=messages, max_tokens=5, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens > 0  # the same prompt again


async def test_async_client_and_completions(pool: Cluster) -> None:
    model = model_of(pool)
    session = AgentSession(
        openai.AsyncOpenAI(base_url=pool.gateway.url + "/v1", api_key=API_KEY, max_retries=0)
    )
    reply = await session.client.completions.create(model=model, prompt="once upon a time", max_tokens=3)
    assert reply.choices[0].text and reply.usage.completion_tokens == 3
    with session.tool_call():
        stream = await session.client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "call a tool"}], max_tokens=4, stream=True
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert session.headers == {"x-session-id": session.session_id}
    await session.client.close()


def test_an_agent_session_stays_on_its_worker_and_hits_the_cache(pool: Cluster) -> None:
    model = model_of(pool)
    sdk = client(pool)
    messages = [{"role": "system", "content": "You are a coding agent. " * 20}]
    workers, cached, prompts, expected = set(), [], [], []
    for turn in range(5):
        messages.append({"role": "user", "content": f"tool result {turn}: " + "x" * 200})
        raw = bind_session(sdk, "agent-1").chat.completions.with_raw_response.create(
            model=model, messages=messages, max_tokens=4
        )
        reply = raw.parse()
        workers.add(raw.headers["x-kvgate-worker"])
        expected.append(int(raw.headers["x-kvgate-cached-tokens-expected"]))
        cached.append(reply.usage.prompt_tokens_details.cached_tokens)
        prompts.append(reply.usage.prompt_tokens)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
    assert len(workers) == 1
    for turn in range(1, 5):
        assert cached[turn] >= 0.9 * prompts[turn - 1], (cached, prompts)
        # the gateway's hashes are the worker's: what it predicted is what the worker had
        assert cached[turn] - 16 <= expected[turn] <= cached[turn], (expected, cached)


def test_bad_input_gets_openai_errors_and_the_gateway_keeps_serving(pool: Cluster) -> None:
    model = model_of(pool)
    ok = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    cases = [
        (b"{not json", 400, None),
        (json.dumps({"model": model, "messages": "hi"}).encode(), 400, "messages"),
        (json.dumps({"model": model}).encode(), 400, "messages"),
        (
            json.dumps({"model": model, "messages": [{"role": "user", "content": "x"}], "n": 2}).encode(),
            400,
            "n",
        ),
        (
            json.dumps({"model": model, "messages": [{"role": "user"}], "max_tokens": "2"}).encode(),
            400,
            "max_tokens",
        ),
        (
            json.dumps({"model": model, "messages": [{"role": "wizard", "content": "x"}]}).encode(),
            400,
            "messages",
        ),
        (
            json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "x"}]}).encode(),
            404,
            "model",
        ),
        (
            json.dumps({"model": model, "messages": [{"role": "user", "content": "x" * MAX_BODY}]}).encode(),
            413,
            None,
        ),
    ]
    for body, status, param in cases:
        got, error = post(pool, "/v1/chat/completions", body)
        assert got == status, (body[:80], got, error)
        assert set(error["error"]) == {"message", "type", "param", "code"} and error["error"]["message"]
        assert error["error"]["param"] == param
        # a query string takes the application's router and middlewares, not the direct route: the
        # same answer either way
        assert post(pool, "/v1/chat/completions?via=app", body) == (got, error)
    got, error = post(pool, "/v1/chat/completions", ok.encode(), key="wrong")
    assert got == 401 and error["error"]["code"] == "invalid_api_key"
    assert post(pool, "/v1/chat/completions?via=app", ok.encode(), key="wrong") == (got, error)
    got, error = post(pool, "/v1/completions", b"[1, 2]")
    assert got == 400 and post(pool, "/v1/completions?via=app", b"[1, 2]") == (got, error)
    with pytest.raises(openai.BadRequestError):
        client(pool).chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}], n=3)
    got, reply = post(pool, "/v1/chat/completions", ok.encode())
    assert got == 200 and reply["choices"][0]["message"]["content"]


def test_models_health_ready_metrics(pool: Cluster) -> None:
    assert http_get(pool.gateway.url + "/health")[0] == 200
    status, ready = http_get(pool.gateway.url + "/ready")
    assert status == 200 and ready["workers"] == 2 and ready["nats"]
    assert http_get(pool.gateway.url + "/v1/models")[0] == 401
    # the served context, as vLLM lists it: the workers' own, then the gateway's (the least of them)
    own = [http_get(w.url + "/v1/models")[1]["data"][0]["max_model_len"] for w in pool.workers.values()]
    listed = http_get(pool.gateway.url + "/v1/models", {"authorization": f"Bearer {API_KEY}"})[1]["data"]
    assert own[0] > 0 and [m["max_model_len"] for m in listed] == [min(own)]
    with urllib.request.urlopen(pool.gateway.url + "/metrics") as resp:
        text = resp.read().decode()
    for name in (
        "kvgate_requests_total", "kvgate_ttft_seconds_bucket", "kvgate_inter_token_latency_seconds_bucket",
        "kvgate_routing_decisions_total", "kvgate_cache_hit_ratio", "kvgate_worker_running",
        "kvgate_worker_event_lag_seconds", "kvgate_approximate_workers", "kvgate_workers 2.0",
        'kvgate_router_holding{stage="for_room"} 0.0',
    ):  # fmt: skip
        assert name in text, name


def test_a_killed_worker_loses_no_unstarted_request_and_leaves_the_view(cluster: Cluster) -> None:
    for i in range(2):
        cluster.worker(f"k{i}", "mock", "--speedup", "20")  # slow enough that requests overlap the kill
    cluster.start_gateway()
    cluster.ready(workers=2)
    model = http_get(cluster.gateway.url + "/v1/models")[1]["data"][0]["id"]

    async def one(sdk: openai.AsyncOpenAI, i: int) -> str:
        reply = await sdk.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"request {i} " * 30}], max_tokens=8
        )
        return reply.choices[0].finish_reason

    async def run() -> list[str]:
        # 24 connections opened at once: on a loaded machine the last requests' set-up in this loop can
        # outlast the SDK's 5 s connect timeout for the first ones (seen in a loaded full run)
        sdk = openai.AsyncOpenAI(
            base_url=cluster.gateway.url + "/v1", api_key="none", max_retries=0, timeout=120
        )
        tasks = [asyncio.create_task(one(sdk, i)) for i in range(24)]
        await asyncio.sleep(0.3)
        cluster.workers["k0"].kill()
        killed_at = time.monotonic()
        results = await asyncio.gather(*tasks)
        while http_get(cluster.gateway.url + "/ready")[1]["workers"] != 1:
            # stale after 10 s without a heartbeat (conftest), well before its registry entry's 60 s TTL would
            # lapse: the bound leaves a loaded machine room for the requests above and the sweep
            assert time.monotonic() - killed_at < 60.0, "the dead worker is still in the routing view"
            await asyncio.sleep(0.05)
        await sdk.close()
        return results

    assert asyncio.run(run()) == ["length"] * 24


def metric(url: str, line_start: str) -> float | None:
    with urllib.request.urlopen(url + "/metrics") as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
    return None


def test_disconnect_cancels_upstream_and_a_full_queue_answers_429(cluster: Cluster) -> None:
    cluster.worker("slow", "mock")  # real-time mock: about 6 ms per token
    cluster.start_gateway("--max-inflight-per-worker", "1", "--queue-bound", "1")
    cluster.ready(workers=1)
    url = cluster.gateway.url
    # ~100 s to generate in full: a worker that kept going would still be running at the 30 s bound
    body = {"model": "mock", "messages": [{"role": "user", "content": "write a novel"}], "max_tokens": 16_000}

    async def run() -> None:
        async with aiohttp.ClientSession() as http:
            # a client that reads one event and hangs up: the worker must stop generating
            async with http.post(url + "/v1/chat/completions", json={**body, "stream": True}) as resp:
                assert resp.status == 200
                await resp.content.readline()
            running = 'kvgate_worker_running{worker="slow"}'
            deadline = time.monotonic() + 30  # room for a loaded box, far below the full answer's time
            while metric(url, running) != 0.0 or metric(url, 'kvgate_worker_inflight{worker="slow"}') != 0.0:
                assert time.monotonic() < deadline, "the worker kept generating for a client that left"
                await asyncio.sleep(0.1)
            # one running, one queued, the rest refused with Retry-After
            tasks = [
                asyncio.create_task(http.post(url + "/v1/chat/completions", json={**body, "max_tokens": 100}))
                for _ in range(4)
            ]
            responses = await asyncio.gather(*tasks)
            statuses = sorted(r.status for r in responses)
            refused = [r for r in responses if r.status == 429]
            assert statuses == [200, 200, 429, 429], statuses
            for r in refused:
                assert r.headers["Retry-After"] and (await r.json())["error"]["code"] == "overloaded"
            for r in responses:
                r.release()

    asyncio.run(run())


async def test_a_tool_loop_turn_pins_its_blocks_on_its_worker(pool: Cluster) -> None:
    nc = await nats.connect(pool.nats_url)
    hints: asyncio.Queue[tuple[str, PinHint]] = asyncio.Queue()

    async def on_pin(msg: nats.aio.msg.Msg) -> None:
        await hints.put((Subjects.worker_of(msg.subject), decode(msg.data, PinHint)))

    await nc.subscribe(Subjects(pool.namespace).prefix + ".pin.>", cb=on_pin)
    session = AgentSession(
        openai.AsyncOpenAI(base_url=pool.gateway.url + "/v1", api_key=API_KEY, max_retries=0)
    )
    try:
        messages = [{"role": "user", "content": "run the tests and tell me what fails " * 4}]
        raw = await session.client.chat.completions.with_raw_response.create(
            model=model_of(pool), messages=messages, max_tokens=2
        )
        assert hints.empty()  # an ordinary turn pins nothing
        with session.tool_call():
            raw = await session.client.chat.completions.with_raw_response.create(
                model=model_of(pool), messages=messages, max_tokens=2
            )
        worker, hint = await asyncio.wait_for(hints.get(), 30)  # generous: a loaded box delays the bus
        assert worker == raw.headers["x-kvgate-worker"]
        # with API keys, the session is the tenant's (namespaced on the bus)
        assert public(hint.session_id) == session.session_id and hint.block_hashes and hint.ttl_s > 0
    finally:
        await session.client.close()
        await nc.close()


def test_a_nats_outage_keeps_the_gateway_serving(tmp_path: Path) -> None:
    with NatsServer() as own_nats:  # its own server: stopping the shared one would disturb other tests
        cluster = Cluster(own_nats.url, "outage", tmp_path)
        try:
            nats_outage(own_nats, cluster)
        finally:
            cluster.stop()


def nats_outage(nats_server: NatsServer, cluster: Cluster) -> None:
    cluster.worker("n0", "mock", "--speedup", "1000")
    cluster.start_gateway("--worker-stale-after-s", "3")  # the default, which the outage below outlasts
    cluster.ready(workers=1)
    sdk = openai.OpenAI(base_url=cluster.gateway.url + "/v1", api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "still there?"}]
    try:
        nats_server.stop()
        time.sleep(4.0)  # longer than a heartbeat timeout: the worker must not be dropped for it
        reply = sdk.chat.completions.create(model="mock", messages=messages, max_tokens=2)
        assert reply.choices[0].finish_reason == "length"
        assert http_get(cluster.gateway.url + "/ready")[1]["nats"] is False
    finally:
        nats_server.start()
    deadline = time.monotonic() + 60  # a reconnect backs off; generous for a loaded box
    while http_get(cluster.gateway.url + "/ready")[0] != 200:
        assert time.monotonic() < deadline, "the gateway did not come back to the bus"
        time.sleep(0.2)
    assert sdk.chat.completions.create(model="mock", messages=messages, max_tokens=2).choices[0].message


def test_a_worker_dying_mid_stream_ends_the_stream_with_an_error_event(cluster: Cluster) -> None:
    cluster.worker("dies", "mock")  # real-time mock: the stream lasts long enough to kill it midway
    cluster.start_gateway()
    cluster.ready(workers=1)
    sdk = openai.OpenAI(base_url=cluster.gateway.url + "/v1", api_key="none", max_retries=0)
    stream = sdk.chat.completions.create(
        model="mock", messages=[{"role": "user", "content": "go on"}], max_tokens=3000, stream=True
    )
    received = 0
    with pytest.raises(openai.APIError, match="mid-stream"):
        for _chunk in stream:
            received += 1
            if received == 3:
                cluster.workers["dies"].kill()
    assert received >= 3
    assert http_get(cluster.gateway.url + "/health")[0] == 200


def test_requests_waiting_on_a_hung_worker_are_retried_when_it_leaves(cluster: Cluster) -> None:
    for name in ("hangs", "fine"):
        cluster.worker(name, "mock", "--speedup", "100")
    cluster.start_gateway()
    cluster.ready(workers=2)
    hung = cluster.workers["hangs"].proc
    hung.send_signal(signal.SIGSTOP)  # alive to the kernel (connections accepted), silent to everyone
    try:

        async def run() -> list[str]:
            sdk = openai.AsyncOpenAI(
                base_url=cluster.gateway.url + "/v1", api_key="none", max_retries=0, timeout=120
            )
            replies = await asyncio.gather(*(
                sdk.chat.completions.with_raw_response.create(
                    model="mock", messages=[{"role": "user", "content": f"session {i} " * 20}], max_tokens=4,
                    extra_headers={"x-session-id": f"hung-{i}"},
                )
                for i in range(6)
            ))  # fmt: skip
            await sdk.close()
            return [r.headers["x-kvgate-worker"] for r in replies]

        started = time.monotonic()
        assert asyncio.run(run()) == ["fine"] * 6
        # the heartbeat timeout (10 s here), not the 120 s read timeout; the rest is room for a loaded machine
        assert time.monotonic() - started < 60
    finally:
        cluster.workers["hangs"].kill()


def test_the_gateways_router_sends_decodes_apart_only_where_the_answers_can_be_joined() -> None:
    """The gateway splits a turn (gateway/split_turn.py) only on a worker that schedules by priority and
    returns token ids, and not at all with `split_turns` off (`--no-split-turns`), whatever the router
    settings say: its router must not treat a worker's decodes as yielding where they do not."""
    router_config = RouterConfig(yield_decodes=True)

    def registration(wid: str, ids: bool) -> WorkerRegistration:
        url = f"http://{wid}"
        return WorkerRegistration(
            wid, url, "m", 16, 1000, "mock", 1, 0.0, priority_threshold=10, returns_token_ids=ids
        )

    gateway = Gateway(GatewayConfig(nats_url="nats://127.0.0.1:1", router_config=router_config))
    gateway.router.add_worker(registration("joined", True), 0.0)
    gateway.router.add_worker(registration("plain", False), 0.0)  # a worker that returns no token ids
    assert gateway.router.decode_priority("joined") == -11 and gateway.router.decode_priority("plain") is None
    config = GatewayConfig(nats_url="nats://127.0.0.1:1", router_config=router_config, split_turns=False)
    off = Gateway(config)
    off.router.add_worker(registration("joined", True), 0.0)
    assert off.router.decode_priority("joined") is None and not off.turns._splits_turns


def test_the_gateways_wait_for_a_held_pick_outlasts_the_routers_longest_bound() -> None:
    """The gateway's wait for a pick held for memory is a safety net behind the router's own bounds: it
    must not send a pick before the longer, crowded bound (router/memory_hold.py) lets it go."""
    for plain, crowded in ((20.0, 60.0), (90.0, 30.0)):
        router_config = RouterConfig(memory_hold_max_s=plain, memory_hold_crowded_max_s=crowded)
        gateway = Gateway(GatewayConfig(nats_url="nats://127.0.0.1:1", router_config=router_config))
        assert gateway.rooms.timeout_s == max(plain, crowded) + gateway.config.queue_timeout_s
