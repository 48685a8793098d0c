"""The APIs agents speak, end to end through `kvgate gateway` with their official clients: Anthropic's
Messages API (`anthropic` SDK), OpenAI's Responses API (`openai` SDK, the Agents SDK), and the same
conversation through all three endpoints. A real nats-server, two mock workers and the gateway, each
its own process, shared by this module's tests."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator

import anthropic
import pytest

from gateway.natsd import NatsServer
from tests.gateway.conftest import API_KEY, Cluster, http_get

pytestmark = pytest.mark.slow

SYSTEM = "You are a careful coding agent. Use the tools, then answer briefly. " * 6
TOOLS = [
    {
        "name": "run_tests",
        "description": "Run the test suite",
        "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}},
    }
]


@pytest.fixture(scope="module")
def pool(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not nats_server.running:
        nats_server.start()
    cluster = Cluster(nats_server.url, "t" + uuid.uuid4().hex[:10], tmp_path_factory.mktemp("apis"))
    try:
        for i in range(2):
            cluster.worker(f"a{i}", "mock", "--speedup", "1000")
        cluster.start_gateway("--api-key", API_KEY)
        cluster.ready(workers=2)
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def model(pool: Cluster) -> str:
    return http_get(pool.gateway.url + "/v1/models", {"authorization": f"Bearer {API_KEY}"})[1]["data"][0][
        "id"
    ]


def claude(pool: Cluster) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=pool.gateway.url, api_key=API_KEY, max_retries=0)


def post(pool: Cluster, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(
        pool.gateway.url + path, data=body, headers={"content-type": "application/json", **headers}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# --- Anthropic Messages


def test_messages_tool_loop_session_stays_and_hits_the_cache(pool: Cluster, model: str) -> None:
    """Five turns of a tool loop, alternating streamed and whole answers: one worker, and each turn
    reads at least 90 % of the previous turn's prompt from the cache."""
    sdk = claude(pool)
    messages: list[dict] = [{"role": "user", "content": "Find the failing test and fix it."}]
    workers, cached, prompts = set(), [], []
    for turn in range(5):
        headers = {"x-claude-code-session-id": "cc-session-1"}
        if turn % 2:
            with sdk.messages.stream(
                model=model,
                max_tokens=6,
                system=SYSTEM,
                messages=messages,
                tools=TOOLS,
                extra_headers=headers,
            ) as stream:
                kinds = [event.type for event in stream]
                reply = stream.get_final_message()
                worker = stream.response.headers["x-kvgate-worker"]
            assert kinds[0] == "message_start" and kinds[-1] == "message_stop", kinds
            assert "content_block_start" in kinds and "message_delta" in kinds
        else:
            raw = sdk.messages.with_raw_response.create(
                model=model,
                max_tokens=6,
                system=SYSTEM,
                messages=messages,
                tools=TOOLS,
                extra_headers=headers,
            )
            reply, worker = raw.parse(), raw.headers["x-kvgate-worker"]
            assert raw.headers["x-kvgate-session"].startswith("cc-session-1/")
        workers.add(worker)
        assert reply.type == "message" and reply.role == "assistant" and reply.stop_reason == "max_tokens"
        assert reply.content[0].type == "text" and reply.content[0].text
        assert reply.usage.output_tokens == 6
        cached.append(reply.usage.cache_read_input_tokens)
        prompts.append(reply.usage.input_tokens + reply.usage.cache_read_input_tokens)
        # the agent ran the tool the model asked for (a mock model asks for none: the client plays it)
        call_id = f"toolu_{turn}"
        messages.append(
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": reply.content[0].text},
                    {"type": "tool_use", "id": call_id, "name": "run_tests", "input": {"path": f"t{turn}"}},
                ],
            }
        )
        messages.append(
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": call_id, "content": f"{turn} failed " * 20}
                ],
            }
        )
    assert len(workers) == 1, workers
    for turn in range(1, 5):
        assert cached[turn] >= 0.9 * prompts[turn - 1], (cached, prompts)


async def test_messages_async_client_stream_and_not(pool: Cluster, model: str) -> None:
    sdk = anthropic.AsyncAnthropic(base_url=pool.gateway.url, api_key=API_KEY, max_retries=0)
    try:
        reply = await sdk.messages.create(
            model=model, max_tokens=3, messages=[{"role": "user", "content": "hello"}]
        )
        assert reply.content[0].text and reply.usage.output_tokens == 3
        stream = await sdk.messages.create(
            model=model, max_tokens=3, messages=[{"role": "user", "content": "hello"}], stream=True
        )
        events = [event async for event in stream]
        assert [e.type for e in events[:2]] == ["message_start", "content_block_start"]
        assert events[-2].type == "message_delta" and events[-2].usage.output_tokens == 3
        # the same prompt again: the engine's cached tokens are reported as cache reads
        assert events[-2].usage.cache_read_input_tokens > 0
    finally:
        await sdk.close()


def test_claude_code_traffic_is_accepted_and_its_billing_line_ignored(pool: Cluster, model: str) -> None:
    """A request shaped as Claude Code sends it: `?beta=true`, betas, fields no engine honours, a
    server tool, and a billing line in the system prompt that changes on every call."""
    sdk = claude(pool)
    counts = []
    for cch in ("1a2b3", "9f8e7"):
        system = [
            {"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.0.1; cch={cch};"},
            {"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}},
        ]
        body = {
            "model": model,
            "max_tokens": 32000,
            "system": system,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]}],
            "tools": [*TOOLS, {"type": "web_search_20250305", "name": "web_search"}],
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "context_management": {"edits": []},
            "output_config": {"effort": "high"},
            "metadata": {"user_id": "user_abc_account_def_session_123"},
        }
        headers = {
            "x-api-key": API_KEY,
            "anthropic-version": "2023-06-01",
            "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
            "x-claude-code-session-id": "cc-billing",
        }
        status, count = post(pool, "/v1/messages/count_tokens?beta=true", json.dumps(body).encode(), headers)
        assert status == 200, count
        counts.append(count["input_tokens"])
        body["max_tokens"] = 4
        status, reply = post(pool, "/v1/messages?beta=true", json.dumps(body).encode(), headers)
        assert status == 200 and reply["type"] == "message", reply
    assert counts[0] == counts[1]  # the billing line is not part of the prompt
    hi = [{"role": "user", "content": "hi"}]
    plain = sdk.messages.count_tokens(model=model, system=SYSTEM, messages=hi, tools=TOOLS)
    assert plain.input_tokens == counts[0]


def test_messages_bad_input_gets_anthropic_errors(pool: Cluster, model: str) -> None:
    headers = {"x-api-key": API_KEY}
    good = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    cases = [
        (b"{not json", 400),
        (json.dumps({**good, "max_tokens": None}).encode(), 400),
        (json.dumps({**good, "messages": []}).encode(), 400),
        (json.dumps({**good, "messages": [{"role": "system", "content": "x"}]}).encode(), 400),
        (json.dumps({**good, "temperature": 3}).encode(), 400),
        (
            json.dumps(
                {**good, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}
            ).encode(),
            400,
        ),
        (json.dumps({**good, "model": "no-such-model"}).encode(), 404),
    ]
    for body, status in cases:
        got, error = post(pool, "/v1/messages", body, headers)
        assert got == status, (body, error)
        assert error["type"] == "error" and error["error"]["type"] in (
            "invalid_request_error",
            "not_found_error",
        )
        assert isinstance(error["error"]["message"], str) and error["error"]["message"]
    got, error = post(pool, "/v1/messages", json.dumps(good).encode(), {"x-api-key": "wrong"})
    assert got == 401 and error["error"]["type"] == "authentication_error"
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "only a user sends results"}
    with pytest.raises(anthropic.BadRequestError):
        claude(pool).messages.create(
            model=model, max_tokens=4, messages=[{"role": "assistant", "content": [result]}]
        )
    assert post(pool, "/v1/messages", json.dumps(good).encode(), headers)[0] == 200  # still serving


def test_messages_sub_agent_is_a_child_session(pool: Cluster, model: str) -> None:
    sdk = claude(pool)
    headers = {"x-claude-code-session-id": "cc-parent"}
    sessions = set()
    for task in ("Fix the bug.", "Sub-agent: search the repo for uses of parse()."):
        raw = sdk.messages.with_raw_response.create(
            model=model,
            max_tokens=2,
            system=SYSTEM,
            messages=[{"role": "user", "content": task}],
            extra_headers=headers,
        )
        sessions.add(raw.headers["x-kvgate-session"])
    assert len(sessions) == 2 and all(s.startswith("cc-parent/") for s in sessions)


def test_messages_concurrent_async_sessions(pool: Cluster, model: str) -> None:
    async def run() -> list[str]:
        sdk = anthropic.AsyncAnthropic(base_url=pool.gateway.url, api_key=API_KEY, max_retries=0)
        try:
            replies = await asyncio.gather(
                *(
                    sdk.messages.create(
                        model=model, max_tokens=2, messages=[{"role": "user", "content": f"q{i}"}]
                    )
                    for i in range(6)
                )
            )
        finally:
            await sdk.close()
        return [r.stop_reason for r in replies]

    assert asyncio.run(run()) == ["max_tokens"] * 6
