"""The worker's HTTP surface, served for real on a local port, called with the real `openai` client."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import openai
import pytest

from engines.engine import Engine, EngineConfig, EngineRequest
from engines.loop import KEEPALIVE_S, EngineLoop
from engines.mock import PLACEHOLDER_TEXT, MockRunner
from engines.runner import SamplingParams
from engines.text_stream import TextStream
from engines.worker import WorkerApp, WorkerSettings
from router.chat import ByteTokenizer, encode_chat
from tests.polling import until
from tests.serving import serving
from tests.slow_body import SlowBody

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "x" * 100}]


@dataclass
class Served:
    url: str
    worker: WorkerApp
    engine: Engine


@contextlib.asynccontextmanager
async def serve(
    speedup: float = 1000.0,
    num_blocks: int = 256,
    settings: WorkerSettings | None = None,
    keepalive_s: float = KEEPALIVE_S,
) -> AsyncIterator[Served]:
    runner = MockRunner(num_blocks, 16, speedup=speedup)
    engine = Engine(EngineConfig(num_blocks=num_blocks, block_size=16), runner)
    loop = EngineLoop(engine, threaded=False, keepalive_s=keepalive_s)
    worker = WorkerApp(loop, runner.tokenizer, settings or WorkerSettings(model_name="mock-model"))
    loop.start()
    worker.ready = True
    try:
        async with serving(worker.app, handler_cancellation=True) as url:
            yield Served(url, worker, engine)
    finally:
        await loop.stop()


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    async with serve() as result:
        yield result


async def wait_idle(engine: Engine) -> None:
    for _ in range(250):
        if not engine.has_work():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the engine still has work")


def client(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=30)


async def test_non_streaming_chat_with_usage_and_a_cached_second_turn(served: Served) -> None:
    api = client(served.url)
    first = await api.chat.completions.create(model="mock-model", messages=MESSAGES, max_tokens=5)
    prompt_len = len(encode_chat(MESSAGES, ByteTokenizer()))
    assert first.choices[0].message.role == "assistant"
    assert first.choices[0].message.content == PLACEHOLDER_TEXT[:5]
    assert first.choices[0].finish_reason == "length"
    assert first.usage.prompt_tokens == prompt_len
    assert first.usage.completion_tokens == 5 and first.usage.total_tokens == prompt_len + 5
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = await api.chat.completions.create(model="mock-model", messages=MESSAGES, max_completion_tokens=2)
    assert second.usage.prompt_tokens_details.cached_tokens == (prompt_len - 1) // 16 * 16
    assert second.usage.completion_tokens == 2
    models = await api.models.list()
    assert [m.id for m in models.data] == ["mock-model"]


async def test_streaming_chat_like_openai(served: Served) -> None:
    api = client(served.url)
    stream = await api.chat.completions.create(
        model="mock-model",
        messages=MESSAGES,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == PLACEHOLDER_TEXT[:6]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 0


async def test_raw_sse_framing_and_done(served: Served) -> None:
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 3, "stream": True}
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{served.url}/v1/chat/completions", json=body) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = (await resp.read()).decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert all(p["object"] == "chat.completion.chunk" and "usage" not in p for p in payloads)


async def test_the_role_chunk_leaves_with_the_first_token(served: Served) -> None:
    # a router reads a stream's first event as its first token (the prefill over): the role delta does
    # not go out alone before it, as vLLM's does not; the two leave in one write, one HTTP chunk
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 3, "stream": True}
    first = b""
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{served.url}/v1/chat/completions", json=body) as resp,
    ):
        async for data, end_of_http_chunk in resp.content.iter_chunks():
            first += data
            if end_of_http_chunk:
                break
        await resp.read()
    events = [json.loads(e.removeprefix("data: ")) for e in first.decode().split("\n\n") if e]
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas == [{"role": "assistant", "content": ""}, {"content": PLACEHOLDER_TEXT[0]}]


async def test_completions_with_stop_string_and_streaming(served: Served) -> None:
    api = client(served.url)
    done = await api.completions.create(model="m", prompt="hello", max_tokens=40, stop=["sum"])
    assert done.choices[0].text == "lorem ip" and done.choices[0].finish_reason == "stop"
    stream = await api.completions.create(
        model="m", prompt=[1, 2, 3], max_tokens=40, stop="dolor", stream=True
    )
    parts = [c async for c in stream]
    assert "".join(p.choices[0].text for p in parts) == "lorem ipsum "
    assert parts[-1].choices[0].finish_reason == "stop"
    # the stopped sequence was freed, not left to run to max_tokens
    await wait_idle(served.engine)
    assert served.engine.block_manager.num_used == 0


async def test_pretokenized_prompt_from_the_gateway_is_used_as_is(served: Served) -> None:
    api = client(served.url)
    tokens = encode_chat(MESSAGES, ByteTokenizer())
    first = await api.chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": "ignored when token ids are given"}],
        max_tokens=1,
        extra_body={"kvgate": {"prompt_token_ids": tokens, "request_id": "req-1", "session_id": "s-1"}},
    )
    assert first.id == "chatcmpl-req-1" and first.usage.prompt_tokens == len(tokens)
    # rendering the same messages produces the same tokens: the prefix is a cache hit
    second = await api.chat.completions.create(model="m", messages=MESSAGES, max_tokens=1)
    assert second.usage.prompt_tokens_details.cached_tokens == (len(tokens) - 1) // 16 * 16


async def test_return_token_ids_as_vllm_answers_it(served: Served) -> None:
    """vLLM's `return_token_ids`: `prompt_token_ids` on the answer (a stream's first chunk only) and the
    output's `token_ids` on its choice (per chunk in a stream: the ids since the last chunk)."""
    tokens = encode_chat(MESSAGES, ByteTokenizer())
    placeholder = ByteTokenizer().encode(PLACEHOLDER_TEXT)
    body = {"model": "m", "messages": MESSAGES, "max_tokens": 4, "return_token_ids": True}
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{served.url}/v1/chat/completions", json=body) as resp:
            whole = await resp.json()
        assert whole["prompt_token_ids"] == tokens
        assert whole["choices"][0]["token_ids"] == placeholder[:4]
        async with http.post(f"{served.url}/v1/chat/completions", json={**body, "stream": True}) as resp:
            raw = (await resp.read()).decode()
        prompt = {"model": "m", "prompt": tokens, "max_tokens": 4, "return_token_ids": True, "stream": True}
        async with http.post(f"{served.url}/v1/completions", json=prompt) as resp:
            completion = (await resp.read()).decode()
        url = f"{served.url}/v1/chat/completions"
        async with http.post(url, json={**body, "return_token_ids": False}) as resp:
            plain = await resp.json()
    chunks = [json.loads(e.removeprefix("data: ")) for e in raw.split("\n\n")[:-2]]
    assert [("prompt_token_ids" in c) for c in chunks] == [True] + [False] * (len(chunks) - 1)
    assert chunks[0]["prompt_token_ids"] == tokens
    assert [i for c in chunks for i in c["choices"][0]["token_ids"]] == placeholder[:4]
    pieces = [json.loads(e.removeprefix("data: ")) for e in completion.split("\n\n")[:-2]]
    assert pieces[0]["prompt_token_ids"] == tokens
    assert [i for c in pieces for i in c["choices"][0]["token_ids"]] == placeholder[:4]
    assert "prompt_token_ids" not in plain and "token_ids" not in plain["choices"][0]  # not asked


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_continued_from_its_first_token_reads_as_one_answer(
    served: Served, stream: bool
) -> None:
    """`kvgate.output_token_ids`: the request continues an answer whose output so far follows the
    prompt; its text and token ids go on from there as one request's would (the mock's output depends
    on the position in the answer, as a model's on its context)."""
    api = client(served.url)
    tokens = encode_chat(MESSAGES, ByteTokenizer())
    whole = await api.chat.completions.create(model="m", messages=MESSAGES, max_tokens=7)
    first = await api.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=1, extra_body={"return_token_ids": True}
    )
    first_ids = first.choices[0].model_extra["token_ids"]
    assert first.model_extra["prompt_token_ids"] == tokens and len(first_ids) == 1
    extension = {"prompt_token_ids": tokens, "output_token_ids": first_ids}
    rest_kwargs = {"model": "m", "messages": MESSAGES, "max_tokens": 6, "extra_body": {"kvgate": extension}}
    if stream:
        chunks = [c async for c in await api.chat.completions.create(**rest_kwargs, stream=True)]
        rest = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        answer = await api.chat.completions.create(**rest_kwargs)
        rest = answer.choices[0].message.content
        assert answer.usage.prompt_tokens == len(tokens) + 1 and answer.usage.completion_tokens == 6
        # the prompt and the first token: a prefix hit but for the last partial block
        assert answer.usage.prompt_tokens_details.cached_tokens == len(tokens) // 16 * 16
    assert first.choices[0].message.content + rest == whole.choices[0].message.content


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": MESSAGES, "n": 2}, "n"),
        ({"messages": MESSAGES, "logprobs": True}, "logprobs"),
        ({"messages": MESSAGES, "presence_penalty": 0.5}, "presence_penalty"),
        ({"messages": MESSAGES, "response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": MESSAGES, "temperature": 3}, "temperature"),
        ({"messages": MESSAGES, "top_p": 0}, "top_p"),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": MESSAGES, "stream_options": {"include_usage": True}}, "stream_options"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ({"messages": MESSAGES, "kvgate": {"prompt_token_ids": [1, -1]}}, "kvgate.prompt_token_ids"),
        ({"messages": MESSAGES, "kvgate": {"prompt_token_ids": [1, True]}}, "kvgate.prompt_token_ids"),
        ({"messages": MESSAGES, "kvgate": {"prompt_token_ids": [1, 2.0]}}, "kvgate.prompt_token_ids"),
        ({"messages": MESSAGES, "kvgate": {"prompt_token_ids": [1, 10**9]}}, "kvgate.prompt_token_ids"),
        ({"messages": MESSAGES, "kvgate": {"prompt_token_ids": []}}, "kvgate.prompt_token_ids"),
        ({"messages": [{"role": "user", "content": "x" * 5000}]}, "messages"),
        ({"messages": MESSAGES, "priority": "high"}, "priority"),
        ({"messages": MESSAGES, "priority": 1.5}, "priority"),
        ({"messages": MESSAGES, "priority": 1 << 40}, "priority"),
        ({"messages": MESSAGES, "return_token_ids": "yes"}, "return_token_ids"),
        ({"messages": MESSAGES, "kvgate": {"output_token_ids": []}}, "kvgate.output_token_ids"),
        ({"messages": MESSAGES, "kvgate": {"output_token_ids": [1, -2]}}, "kvgate.output_token_ids"),
        ({"messages": MESSAGES, "kvgate": {"output_token_ids": "ab"}}, "kvgate.output_token_ids"),
    ],
)
async def test_unsupported_or_invalid_options_get_a_400(served: Served, body: dict, param: str) -> None:
    api = client(served.url)
    kwargs = {k: v for k, v in body.items() if k != "messages"}
    with pytest.raises(openai.BadRequestError) as caught:
        await api.chat.completions.create(model="m", messages=body["messages"], extra_body=kwargs)
    error = caught.value.body
    assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]


async def test_malformed_and_oversized_bodies(served: Served) -> None:
    url = f"{served.url}/v1/chat/completions"
    async with aiohttp.ClientSession() as http:
        async with http.post(url, data=b"{not json") as resp:
            assert resp.status == 400 and "JSON" in (await resp.json())["error"]["message"]
        async with http.post(url, json=[1, 2]) as resp:
            assert resp.status == 400
        async with http.post(url, data=b'{"a":' * 100_000 + b"1" + b"}" * 100_000) as resp:
            assert resp.status == 400  # nested past the decoder's depth: refused, not a crash
        async with http.post(url, data=b"x" * (17 * 1024 * 1024)) as resp:
            assert resp.status == 413
        async with http.get(f"{served.url}/health") as resp:
            assert resp.status == 200


async def test_client_disconnect_aborts_the_sequence() -> None:
    async with serve(speedup=1.0) as served:  # real-time steps: ~12 ms per decode step
        body = {"model": "m", "messages": MESSAGES, "max_tokens": 5000, "stream": True}
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{served.url}/v1/chat/completions", json=body) as resp,
        ):
            await resp.content.readuntil(b"\n\n")
            await resp.content.readuntil(b"\n\n")
            assert served.engine.has_work()
        await wait_idle(served.engine)
        assert served.engine.block_manager.num_used == 0
        # the same for a non-streaming request the client gives up on
        timeout = aiohttp.ClientTimeout(total=0.3)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            with pytest.raises(asyncio.TimeoutError):
                await http.post(f"{served.url}/v1/chat/completions", json={**body, "stream": False})
        await wait_idle(served.engine)


async def test_a_stream_held_in_the_queue_carries_keepalive_comments() -> None:
    """A 64-block worker decoding a 600-token prompt (38 blocks, growing) cannot admit another such
    prompt: that request's stream has no token until the decode ends, and meanwhile carries SSE
    comments every `keepalive_s`, which the `openai` client skips."""
    async with serve(speedup=1.0, num_blocks=64, keepalive_s=0.05) as served:
        running = {"model": "m", "messages": [{"role": "user", "content": "a" * 580}], "max_tokens": 300}
        held = {"model": "m", "messages": [{"role": "user", "content": "b" * 580}], "max_tokens": 4}
        url = f"{served.url}/v1/chat/completions"
        async with (
            aiohttp.ClientSession() as http,
            http.post(url, json={**running, "stream": True}) as a,
        ):
            assert (await a.content.readuntil(b"\n\n")).startswith(b"data: ")  # decoding
            async with http.post(url, json={**held, "stream": True}) as b:
                stream = await client(served.url).chat.completions.create(**held, stream=True)  # held too
                assert await b.content.readuntil(b"\n\n") == b": keepalive\n\n"
                assert await b.content.readuntil(b"\n\n") == b": keepalive\n\n"
                a.close()  # the decode ends: both are admitted in turn
                events = (await b.read()).split(b"\n\n")
                data = [e for e in events if e.startswith(b"data: ")]
                assert data[-1] == b"data: [DONE]" and events[-1] == b""
                assert all(e.startswith((b"data: ", b": keepalive")) for e in events[:-1])
                text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
                assert text == PLACEHOLDER_TEXT[:4]


async def test_engine_loop_stops_with_a_request_in_flight() -> None:
    engine = Engine(EngineConfig(num_blocks=64, block_size=16), MockRunner(64, 16, speedup=1.0))
    loop = EngineLoop(engine, threaded=False)
    loop.start()
    request = EngineRequest("long", list(range(40)), SamplingParams(max_tokens=500, ignore_eos=True))
    queue = await loop.submit(request)  # ~12 ms a step: still decoding when stopped
    await queue.get()
    assert loop.running
    await asyncio.wait_for(loop.stop(), 10)
    assert not loop.running
    assert queue.qsize() < 500
    # the step's lock was released: state dumps and pins of a stopping publisher still get through
    assert await asyncio.wait_for(loop.call(engine.has_work), 1)


def test_text_stream_holds_back_a_forming_stop_string() -> None:
    tok = ByteTokenizer()
    stream = TextStream(tok, ["END"])
    stream.add(tok.encode("abcE"))
    assert stream.take(final=False) == "ab"  # "cE" could be the start of "END"
    stream.add(tok.encode("N"))
    assert stream.take(final=False) == "c"  # "EN" still could
    stream.add(tok.encode("D and more"))
    assert stream.stopped and stream.take(final=False) == "" and stream.text == "abc"
    multibyte = TextStream(tok, [])
    encoded = "é".encode()
    multibyte.add([encoded[0]])
    assert multibyte.take(final=False) == ""  # half a character is not text yet
    multibyte.add([encoded[1], tok.eos_token_id])
    assert multibyte.take(final=True) == "é"


async def test_bodies_in_transit_are_bounded_in_bytes_and_time() -> None:
    """4,096 requests of 16 MiB bodies would be 64 GiB held while read: a body past the budget gets a
    503 before it is read, one that stops arriving a 408 at its deadline (kvutil/body_budget.py)."""
    body = 1 << 20
    settings = WorkerSettings(
        model_name="mock-model", max_body_bytes=body, body_budget_bytes=2 * body, body_timeout_s=2.0
    )
    async with serve(settings=settings) as served:
        slow = [await SlowBody.open(served.url, "/v1/completions", body) for _ in range(2)]
        await until(lambda: served.worker.bodies.reserved == 2 * body)
        client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.APIStatusError) as refused:
            await client.completions.create(model="mock-model", prompt="hi", max_tokens=2)
        await client.close()
        assert refused.value.status_code == 503
        assert refused.value.body["code"] == "body_refused"  # type: ignore[index]
        for stalled in slow:
            status, answer = await stalled.answer()
            assert status == 408 and json.loads(answer)["error"]["code"] == "body_refused"
            await stalled.close()
        assert served.worker.bodies.reserved == 0
