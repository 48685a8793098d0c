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
import openai
import pytest

from gateway.natsd import NatsServer, free_port
from tests.gateway.conftest import API_KEY, Cluster, Proc, http_get

pytestmark = pytest.mark.slow

OTHER_KEY = "other-tenant-key"

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
            # answers end by themselves (EOS), as a real model's do: a Responses answer cut by its
            # token limit is `incomplete`, which the Agents SDK treats as a failure
            # room for a Claude Code-sized prompt (~76 KB of byte tokens)
            cluster.worker(f"a{i}", "mock", "--speedup", "1000", "--eos-after", "12", "--num-blocks", "8192")
        cluster.start_gateway("--api-key", API_KEY, "--api-key", OTHER_KEY)
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


def claude_code_tools() -> list[dict]:
    """A tool list the size of Claude Code's (~64 KB of JSON), and one of its server tools."""
    properties = {f"option_{j}": {"type": "string", "description": "what it does " * 4} for j in range(6)}
    tools = [
        {
            "name": f"tool_{i}",
            "description": f"Tool {i}: " + "Use it carefully, read the output, then decide. " * 30,
            "input_schema": {"type": "object", "properties": properties, "required": ["option_0"]},
        }
        for i in range(32)
    ]
    return [*tools, {"type": "web_search_20250305", "name": "web_search"}]


def test_claude_code_traffic_is_accepted_and_its_billing_line_ignored(pool: Cluster, model: str) -> None:
    """A request shaped and sized as Claude Code sends it: `?beta=true`, betas, `max_tokens` 32000, a
    64 KB tool list with a server tool, fields no engine honours, and a billing line at the head of the
    system prompt that changes on every call."""
    sdk = claude(pool)
    tools = claude_code_tools()
    counts, sizes, cached = [], [], []
    for cch in ("1a2b3", "9f8e7"):
        system = [
            {"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.0.1; cch={cch};"},
            {"type": "text", "text": SYSTEM * 10, "cache_control": {"type": "ephemeral"}},
        ]
        body = {
            "model": model,
            "max_tokens": 32000,
            "system": system,
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "cache_control": {}}]}],
            "tools": tools,
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "context_management": {"edits": []},
            "output_config": {"effort": "high"},
            "metadata": {"user_id": "user_abc_account_def_session_123"},
        }
        headers = {
            "x-api-key": API_KEY,
            "anthropic-version": "2023-06-01",
            "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,context-1m-2025-08-07",
            "x-claude-code-session-id": "cc-billing",
        }
        raw = json.dumps(body).encode()
        sizes.append(len(raw))
        status, count = post(pool, "/v1/messages/count_tokens?beta=true", raw, headers)
        assert status == 200, count
        counts.append(count["input_tokens"])
        status, reply = post(pool, "/v1/messages?beta=true", raw, headers)
        assert status == 200 and reply["type"] == "message", reply
        assert reply["usage"]["input_tokens"] + reply["usage"]["cache_read_input_tokens"] == counts[-1]
        cached.append(reply["usage"]["cache_read_input_tokens"])
    assert min(sizes) > 70_000, sizes
    assert counts[0] == counts[1]  # the billing line is not part of the prompt
    assert cached[1] >= counts[1] - 16  # so the second call, another cch, found it all cached
    hi = [{"role": "user", "content": "hi"}]
    plain = sdk.messages.count_tokens(model=model, system=SYSTEM * 10, messages=hi, tools=tools)
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
        sdk = anthropic.AsyncAnthropic(base_url=pool.gateway.url, api_key=API_KEY, max_retries=0, timeout=120)
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


# --- OpenAI Responses

FUNCTIONS = [
    {
        "type": "function",
        "name": "run_tests",
        "description": "Run the test suite",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}},
    }
]


def gpt(pool: Cluster, key: str = API_KEY, url: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=(url or pool.gateway.url) + "/v1", api_key=key, max_retries=0)


def test_responses_chain_with_function_calls_stays_and_hits_the_cache(pool: Cluster, model: str) -> None:
    """A previous_response_id chain of five turns, each carrying a function call and its output,
    streamed and not: one worker, one session, >= 90 % of the previous prompt read from the cache."""
    sdk = gpt(pool)
    previous, workers, sessions, cached, prompts = None, set(), set(), [], []
    new_input: list[dict] | str = "Find the failing test and fix it."
    for turn in range(5):
        args = {"model": model, "instructions": SYSTEM, "input": new_input, "tools": FUNCTIONS}
        if previous is not None:
            args["previous_response_id"] = previous.id
        if turn % 2:
            with sdk.responses.with_streaming_response.create(**args, stream=True) as raw:
                workers.add(raw.headers["x-kvgate-worker"])
                sessions.add(raw.headers["x-kvgate-session"])
                events = list(raw.parse())
            kinds = [e.type for e in events]
            assert kinds[:2] == ["response.created", "response.in_progress"], kinds
            assert "response.output_text.delta" in kinds and kinds[-1] == "response.completed"
            assert [e.sequence_number for e in events] == list(range(len(events)))
            reply = events[-1].response
            text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
            assert text == reply.output_text
        else:
            raw = sdk.responses.with_raw_response.create(**args)
            workers.add(raw.headers["x-kvgate-worker"])
            sessions.add(raw.headers["x-kvgate-session"])
            reply = raw.parse()
        assert reply.status == "completed" and reply.output_text and reply.output[0].type == "message"
        assert reply.previous_response_id == (previous.id if previous else None)
        cached.append(reply.usage.input_tokens_details.cached_tokens)
        prompts.append(reply.usage.input_tokens)
        previous = reply
        call = f"call_{turn}"
        new_input = [
            {
                "type": "function_call",
                "call_id": call,
                "name": "run_tests",
                "arguments": f'{{"path":"t{turn}"}}',
            },
            {"type": "function_call_output", "call_id": call, "output": f"{turn} failed " * 20},
        ]
    assert len(workers) == 1 and len(sessions) == 1, (workers, sessions)
    for turn in range(1, 5):
        assert cached[turn] >= 0.9 * prompts[turn - 1], (cached, prompts)
        assert prompts[turn] > prompts[turn - 1]  # the stored conversation was replayed


def test_responses_store_false_unknown_and_other_tenants_ids(pool: Cluster, model: str) -> None:
    sdk = gpt(pool)
    kept = sdk.responses.create(model=model, input="remember this")
    unkept = sdk.responses.create(model=model, input="forget this", store=False)
    assert kept.store is True and unkept.store is False
    assert sdk.responses.create(model=model, input="and?", previous_response_id=kept.id).status == "completed"
    for missing in (unkept.id, "resp_unknown"):
        with pytest.raises(openai.NotFoundError) as error:
            sdk.responses.create(model=model, input="and?", previous_response_id=missing)
        assert error.value.body["code"] == "previous_response_not_found"
        assert error.value.body["param"] == "previous_response_id"
    # another tenant (API key) cannot continue, nor learn that the id exists
    with pytest.raises(openai.NotFoundError):
        gpt(pool, key=OTHER_KEY).responses.create(model=model, input="x", previous_response_id=kept.id)


def test_responses_bad_input_gets_openai_errors(pool: Cluster, model: str) -> None:
    headers = {"authorization": f"Bearer {API_KEY}"}
    cases = [
        (b"[1, 2]", 400),
        (json.dumps({"input": "x"}).encode(), 400),
        (json.dumps({"model": model, "input": []}).encode(), 400),
        (
            json.dumps(
                {"model": model, "input": [{"type": "message", "role": "robot", "content": "x"}]}
            ).encode(),
            400,
        ),
        (
            json.dumps(
                {"model": model, "input": [{"role": "user", "content": [{"type": "input_image"}]}]}
            ).encode(),
            400,
        ),
        (json.dumps({"model": model, "input": "x", "max_output_tokens": 0}).encode(), 400),
        (json.dumps({"model": model, "input": "x", "previous_response_id": 7}).encode(), 400),
        (json.dumps({"model": "no-such-model", "input": "x"}).encode(), 404),
    ]
    for body, status in cases:
        got, error = post(pool, "/v1/responses", body, headers)
        assert got == status, (body, error)
        assert set(error["error"]) == {"message", "type", "param", "code"}, error
    got, _ = post(pool, "/v1/responses", json.dumps({"model": model, "input": "x"}).encode(), {})
    assert got == 401


def test_responses_chain_continues_on_another_gateway_replica(pool: Cluster, model: str) -> None:
    """Stored conversations live in the bus's key-value bucket: a second replica continues a chain."""
    port = free_port()
    argv = [
        "gateway",
        "--nats",
        pool.nats_url,
        "--port",
        str(port),
        "--namespace",
        pool.namespace,
        "--api-key",
        API_KEY,
    ]
    replica = Proc(argv, f"http://127.0.0.1:{port}", pool.tmp / "replica.log")
    try:
        replica.wait_http("/ready", 60)
        first = gpt(pool).responses.create(model=model, instructions=SYSTEM, input="start here")
        second = gpt(pool, url=replica.url).responses.create(
            model=model, instructions=SYSTEM, input="go on", previous_response_id=first.id
        )
        assert second.status == "completed"
        assert second.usage.input_tokens > first.usage.input_tokens
    finally:
        replica.stop()


def test_openai_agents_sdk_multi_turn_through_the_gateway(pool: Cluster, model: str) -> None:
    """The Agents SDK's default model class (the Responses API), a conversation of three turns: the
    first two carried by the SDK's own input list, the third by previous_response_id."""
    from agents import Agent, OpenAIResponsesModel, Runner, function_tool, set_tracing_disabled

    set_tracing_disabled(True)  # its traces would go to OpenAI's servers

    @function_tool
    def run_tests(path: str) -> str:
        """Run the tests under a path."""
        return f"{path}: 3 passed"

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=pool.gateway.url + "/v1", api_key=API_KEY, max_retries=0)
        try:
            agent = Agent(
                name="coder",
                instructions=SYSTEM,
                tools=[run_tests],
                model=OpenAIResponsesModel(model=model, openai_client=client),
            )
            first = await Runner.run(agent, "Find the failing test.")
            second = await Runner.run(
                agent, [*first.to_input_list(), {"role": "user", "content": "Now fix it."}]
            )
            third = await Runner.run(agent, "Thanks.", previous_response_id=second.last_response_id)
            usage = third.context_wrapper.usage
            assert usage.input_tokens > 0 and usage.input_tokens_details.cached_tokens > 0
            return [first.final_output, second.final_output, third.final_output]
        finally:
            await client.close()

    outputs = asyncio.run(run())
    assert all(isinstance(o, str) and o for o in outputs), outputs


# --- one conversation, three APIs


def test_the_same_conversation_is_the_same_prompt_through_all_three_apis(pool: Cluster, model: str) -> None:
    user, said, result = "Find the failing test.", "Running the tests.", "3 passed, 1 failed"
    arguments = '{"path":"tests"}'
    chat = gpt(pool).chat.completions.create(
        model=model,
        max_tokens=2,
        messages=[
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": user},
            {
                "role": "assistant",
                "content": said,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "run_tests", "arguments": arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": result},
        ],
        tools=[{"type": "function", "function": {k: v for k, v in FUNCTIONS[0].items() if k != "type"}}],
    )
    message = claude(pool).messages.create(
        model=model,
        max_tokens=2,
        system=SYSTEM,
        messages=[
            {"role": "user", "content": user},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": said},
                    {"type": "tool_use", "id": "call_1", "name": "run_tests", "input": {"path": "tests"}},
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": result}],
            },
        ],
        tools=TOOLS,
    )
    response = gpt(pool).responses.create(
        model=model,
        max_output_tokens=2,
        instructions=SYSTEM,
        input=[
            {"role": "user", "content": user},
            {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": said}]},
            {"type": "function_call", "call_id": "call_1", "name": "run_tests", "arguments": arguments},
            {"type": "function_call_output", "call_id": "call_1", "output": result},
        ],
        tools=FUNCTIONS,
        store=False,
    )
    prompt = chat.usage.prompt_tokens
    assert prompt > 100
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == prompt
    assert response.usage.input_tokens == prompt
