"""The proxy's streams: what a client sees through the gateway is what the worker would have sent it.

The gateway always asks the worker for usage; a client that did not ask must see neither the usage
chunk nor a `"usage": null` member on the other chunks. The end-to-end tests run a real nats-server,
a mock worker and `kvgate gateway` as processes, and read the raw SSE bytes with aiohttp and the
chunks with the official `openai` client.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from typing import Any

import aiohttp
import openai
import pytest

from gateway.metrics import GatewayMetrics
from gateway.natsd import NatsServer
from gateway.proxy import Outcome, _ChatEvents, _inspect, drop_null_usage, read_usage
from tests.gateway.conftest import Cluster, http_get

# -- the byte edit ------------------------------------------------------------------------------


def event(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


@pytest.mark.parametrize(
    ("before", "after"),
    [
        # last member, as pydantic / msgspec / our worker write it, and json.dumps's default spacing
        (b'{"id":"c","choices":[],"usage":null}', b'{"id":"c","choices":[]}'),
        (b'{"id": "c", "choices": [], "usage": null}', b'{"id": "c", "choices": []}'),
        (b'{"id":"c","choices":[],"usage": null}', b'{"id":"c","choices":[]}'),
        # first, middle, only member; odd whitespace
        (b'{"usage":null,"id":"c","choices":[]}', b'{"id":"c","choices":[]}'),
        (b'{"usage": null, "id": "c"}', b'{"id": "c"}'),
        (b'{"id":"c","usage":null,"choices":[]}', b'{"id":"c","choices":[]}'),
        (b'{"id": "c", "usage": null, "choices": []}', b'{"id": "c", "choices": []}'),
        (b'{"usage":null}', b"{}"),
        (b'{ "usage" :\tnull }', b"{}"),
        (b'{"id":"c","usage" : null ,"x":1}', b'{"id":"c" ,"x":1}'),
    ],
)
def test_drop_null_usage_cuts_the_member_and_one_comma(before: bytes, after: bytes) -> None:
    assert drop_null_usage(event(before)) == event(after)
    assert json.loads(after) == {k: v for k, v in json.loads(before).items() if k != "usage"}


def test_usage_null_inside_the_content_text_is_not_touched() -> None:
    content = 'the chunk said "usage":null and "usage": null, then "usage"'
    for position in ("first", "last"):
        chunk: dict[str, Any] = {"usage": None} if position == "first" else {}
        chunk |= {"id": "c", "choices": [{"index": 0, "delta": {"content": content}}]}
        if position == "last":
            chunk["usage"] = None
        for separators in ((",", ":"), (", ", ": ")):
            raw = json.dumps(chunk, separators=separators).encode()
            edited = drop_null_usage(event(raw))
            expected = {k: v for k, v in chunk.items() if k != "usage"}
            assert edited == event(json.dumps(expected, separators=separators).encode())
            assert json.loads(edited[6:])["choices"][0]["delta"]["content"] == content


def test_a_nested_usage_member_stays() -> None:
    # a nested object's "usage": null comes first; only the top-level member goes
    raw = b'{"choices":[{"index":0,"usage":null,"delta":{}}],"usage":null,"id":"c"}'
    assert drop_null_usage(event(raw)) == event(b'{"choices":[{"index":0,"usage":null,"delta":{}}],"id":"c"}')
    raw = b'{"choices":[{"usage": null}], "usage": null}'
    assert drop_null_usage(event(raw)) == event(b'{"choices":[{"usage": null}]}')


def test_a_member_not_written_literally_is_decoded_and_encoded_again() -> None:
    raw = b'{"id":"c","\\u0075sage":null,"choices":[{"usage":null}]}'
    edited = drop_null_usage(event(raw))
    assert edited.startswith(b"data: ") and edited.endswith(b"\n\n")
    assert json.loads(edited[6:]) == {"id": "c", "choices": [{"usage": None}]}


# -- chunks passed on from their bytes ----------------------------------------------------------

TRICKY_TEXT = ['"finish_reason":null', ',"usage":null}', '"usage":null', '\\"finish_reason', "a\nb", "x"]


def random_chunk(rng: random.Random) -> bytes:
    """A chat chunk in one of the shapes workers write: compact or spaced, usage null, set or absent
    and anywhere, finish reasons null, set, absent or nested, text that looks like the members."""
    choice: dict[str, Any] = {"index": 0, "delta": {"content": rng.choice(TRICKY_TEXT)}, "logprobs": None}
    if rng.random() < 0.2:
        choice["delta"]["finish_reason"] = rng.choice([None, "stop"])  # a key that is not the choice's
    if rng.random() < 0.9:
        choice["finish_reason"] = rng.choice([None, None, None, "stop", "tool_calls"])
    chunk: dict[str, Any] = {"id": "c", "object": "chat.completion.chunk"}
    chunk["choices"] = rng.choice([[choice], [choice], [], [choice, {**choice, "index": 1}]])
    members = list(chunk.items())
    if rng.random() < 0.9:
        usage = rng.choice([None, None, None, {"prompt_tokens": 9, "completion_tokens": 2}])
        members.insert(rng.choice([len(members)] * 4 + [0, 1]), ("usage", usage))
    separators = rng.choice([(",", ":")] * 4 + [(", ", ": "), (",", ": ")])
    return b"data: " + json.dumps(dict(members), separators=separators).encode() + b"\n\n"


def test_chunks_passed_on_from_their_bytes_are_what_decoding_them_gives() -> None:
    """`_ChatEvents` passes most chunks on without decoding them; randomized against the decode."""
    rng = random.Random(13)
    tail = b'{"choices":[{"finish_reason":null}],"usage":null}\n\n'
    others = [b"data: [DONE]\n\n", b": comment " + tail, b"data: x\ndata: " + tail]
    for _ in range(3000):
        event = random_chunk(rng) if rng.random() < 0.95 else rng.choice(others)
        for client_wants_usage in (False, True):
            relayed, decoded = Outcome(), Outcome()
            events = _ChatEvents(client_wants_usage, relayed)
            done = events.read(event)
            assert (events.take(True), done) == _inspect(event, client_wants_usage, decoded), event
            assert relayed == decoded, event


# -- through a real gateway -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def pool(nats_server: NatsServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not nats_server.running:
        nats_server.start()
    cluster = Cluster(nats_server.url, "t" + uuid.uuid4().hex[:10], tmp_path_factory.mktemp("proxy"))
    try:
        cluster.worker("w0", "mock", "--speedup", "1000")
        cluster.start_gateway()
        cluster.ready(workers=1)
        yield cluster
    finally:
        cluster.stop()


def model_of(pool: Cluster) -> str:
    return http_get(pool.gateway.url + "/v1/models")[1]["data"][0]["id"]


def body_for(path: str, model: str, include_usage: bool | None) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "max_tokens": 6, "stream": True}
    if path == "/v1/chat/completions":
        body["messages"] = [{"role": "user", "content": "relay me exactly, " * 8}]
    else:
        body["prompt"] = "relay me exactly, " * 8
    if include_usage is not None:
        body["stream_options"] = {"include_usage": include_usage}
    return body


async def sse_events(url: str, body: dict[str, Any]) -> list[bytes]:
    async with aiohttp.ClientSession() as http, http.post(url, json=body) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["content-type"].startswith("text/event-stream")
        raw = await resp.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    return [e + b"\n\n" for e in raw.split(b"\n\n") if e]


def normalized(event: bytes) -> bytes:
    """The event with the per-response fields (id, created) blanked, bytes otherwise as they were."""
    if not event.startswith(b"data: {"):
        return event
    chunk = json.loads(event[6:])
    for key in ("id", "created"):
        old = json.dumps(chunk[key], separators=(",", ":")).encode()
        event = event.replace(b'"%s":%s' % (key.encode(), old), b'"%s":_' % key.encode(), 1)
    return event


@pytest.mark.slow
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize("include_usage", [None, False, True])
async def test_raw_stream_through_the_gateway_is_the_workers(
    pool: Cluster, path: str, include_usage: bool | None
) -> None:
    worker = pool.workers["w0"].url
    body = body_for(path, model_of(pool), include_usage)
    await sse_events(worker + path, body)  # the prompt is cached from now on: same cached_tokens both ways
    direct = await sse_events(worker + path, body)
    through = await sse_events(pool.gateway.url + path, body)
    assert [normalized(e) for e in through] == [normalized(e) for e in direct]
    chunks = [json.loads(e[6:]) for e in direct[:-1]]
    if include_usage:
        assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["choices"] == []
        assert chunks[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    else:
        assert b'"usage"' not in b"".join(through)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("details", "cached", "host"),
    [
        ({"cached_tokens": 96, "host_cached_tokens": 64}, 96, 64),
        ({"cached_tokens": 96}, 96, 0),  # another engine, or no host tier: all device
        ({"cached_tokens": 32, "host_cached_tokens": 64}, 32, 32),  # never more than the cached
        ({"cached_tokens": 32, "host_cached_tokens": "64"}, 32, 0),
        ({"cached_tokens": 32, "host_cached_tokens": True}, 32, 0),
        ({"cached_tokens": -5, "host_cached_tokens": -7}, 0, 0),  # a broken worker cannot crash a counter
    ],
)
def test_host_cached_tokens_are_read_with_their_bounds(
    details: dict[str, Any], cached: int, host: int
) -> None:
    outcome = Outcome()
    read_usage({"prompt_tokens": 128, "completion_tokens": 1, "prompt_tokens_details": details}, outcome)
    assert (outcome.cached_tokens, outcome.host_cached_tokens) == (cached, host)
    metrics = GatewayMetrics()
    metrics.record_usage(outcome.prompt_tokens, outcome.cached_tokens, outcome.host_cached_tokens)
    page = metrics.render().decode()
    assert f'kvgate_tier_cached_tokens_total{{tier="device"}} {float(cached - host)}' in page
    assert f'kvgate_tier_cached_tokens_total{{tier="host"}} {float(host)}' in page
    assert f'kvgate_tier_cache_hit_ratio{{tier="host"}} {host / 128}' in page


def test_openai_client_sees_usage_only_when_it_asked(pool: Cluster) -> None:
    sdk = openai.OpenAI(base_url=pool.gateway.url + "/v1", api_key="unused", max_retries=0)
    model = model_of(pool)
    messages = [{"role": "user", "content": "usage only when asked, " * 8}]
    chunks = list(sdk.chat.completions.create(model=model, messages=messages, max_tokens=5, stream=True))
    assert chunks and all(c.choices for c in chunks)  # no usage-only chunk
    assert all(c.usage is None and "usage" not in c.model_fields_set for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"

    chunks = list(
        sdk.chat.completions.create(
            model=model, messages=messages, max_tokens=5, stream=True, stream_options={"include_usage": True}
        )
    )
    with_usage = [c for c in chunks if c.usage is not None]
    assert with_usage == [chunks[-1]] and chunks[-1].choices == []
    assert all("usage" in c.model_fields_set for c in chunks)  # null until the last, as OpenAI sends
    usage = chunks[-1].usage
    assert usage.completion_tokens == 5 and usage.prompt_tokens_details.cached_tokens > 0
