"""A turn sent as its prompt and then its decode, live (gateway/split_turn.py): a real NATS, real mock
workers with `--priority-scheduling`, the real `openai` client through in-process gateways, one that
splits turns (the default) and one that does not (`split_turns=False`, `--no-split-turns`)."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from engines.mock import PLACEHOLDER_TEXT
from router.config import RouterConfig
from tests.gateway.conftest import Cluster, Proc
from tests.gateway.gateways import RunningGateway, running_gateway
from tests.polling import until

pytestmark = pytest.mark.slow

# the worker's DEBUG line for each request it takes (engines/worker.py)
_REQUEST_LINE = re.compile(
    r"request (\S+)-[0-9a-f]{8}: (\d+) prompt tokens \((\d+) of them output so far\), "
    r"max_tokens (\d+), priority (-?\d+)"
)


def chat(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def requests_seen(worker: Proc) -> dict[str, list[tuple[int, int, int, int]]]:
    """The worker's requests by the gateway's request id: (prompt tokens, of them output so far,
    max_tokens, priority), in the order it took them."""
    seen: dict[str, list[tuple[int, int, int, int]]] = {}
    for match in _REQUEST_LINE.finditer(worker.log.read_text()):
        request_id, *numbers = match.groups()
        seen.setdefault(request_id, []).append(tuple(int(n) for n in numbers))  # type: ignore[arg-type]
    return seen


def sdk(gateway: RunningGateway) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="none", max_retries=0, timeout=120)


async def worker_metric(worker: Proc, name: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(worker.url + "/metrics") as resp:
        text = await resp.text()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


async def start_workers(cluster: Cluster, *workers: tuple[str, list[str]]) -> None:
    for worker_id, args in workers:
        cluster.worker(worker_id, "mock", "--priority-scheduling", "--log-level", "DEBUG", *args)
    for worker_id, _ in workers:
        await asyncio.to_thread(cluster.workers[worker_id].wait_http, "/health", 60.0)


async def stream_chunks(client: openai.AsyncOpenAI, **kwargs: Any) -> list[Any]:
    return [chunk async for chunk in await client.chat.completions.create(stream=True, **kwargs)]


async def raw_stream(gateway: RunningGateway, body: dict[str, Any]) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.post(gateway.url + "/v1/chat/completions", json={**body, "stream": True}) as resp,
    ):
        assert resp.status == 200
        return await resp.text()


async def test_a_split_turn_reads_as_the_unsplit_one(cluster: Cluster, nats_url: str, namespace: str) -> None:
    """The same turns through a gateway that splits them and one that does not: the same text, finish
    reason and usage, streamed or not; one role delta, one finish, one [DONE]; the worker took the
    split turn as its prompt (one token, priority 0) and its decode (the prompt and the first token,
    the rest of the output, priority -(threshold + 1))."""
    await start_workers(cluster, ("sp0", []), ("eos0", ["--model", "mock-eos", "--eos-after", "0"]))
    worker = cluster.workers["sp0"]
    split_gw = running_gateway(nats_url, namespace, "gw-split")
    whole_gw = running_gateway(nats_url, namespace, "gw-whole", split_turns=False)
    async with split_gw as split, whole_gw as whole:
        await split.wait_ready(workers=2)
        await whole.wait_ready(workers=2)
        assert split.router.decode_priority("sp0") == -11 and whole.router.decode_priority("sp0") is None
        clients = {"split": sdk(split), "whole": sdk(whole)}
        try:
            # non-streamed; each turn a prompt of its own (the same length), so that none is cached
            answers = {
                name: await client.chat.completions.create(
                    model="mock", messages=chat(f"{name:5}-a" + "x" * 300), max_tokens=9
                )
                for name, client in clients.items()
            }
            a, b = answers["split"], answers["whole"]
            assert a.choices[0].message.content == b.choices[0].message.content == PLACEHOLDER_TEXT[:9]
            assert a.choices[0].finish_reason == b.choices[0].finish_reason == "length"
            assert a.usage == b.usage and a.usage is not None and a.usage.completion_tokens == 9
            assert a.id.startswith("chatcmpl-") and not (a.model_extra or {}).get("prompt_token_ids")
            assert "token_ids" not in (a.choices[0].model_extra or {})

            # streamed, with usage asked for
            streams = {
                name: await stream_chunks(
                    client,
                    model="mock",
                    messages=chat(f"{name:5}-b" + "x" * 300),
                    max_tokens=7,
                    stream_options={"include_usage": True},
                )
                for name, client in clients.items()
            }
            for chunks in streams.values():
                choices = [c.choices[0] for c in chunks if c.choices]
                assert "".join(c.delta.content or "" for c in choices) == PLACEHOLDER_TEXT[:7]
                assert sum(1 for c in choices if c.delta.role) == 1
                assert [c.finish_reason for c in choices if c.finish_reason] == ["length"]
                assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
            assert streams["split"][-1].choices == []
            assert streams["split"][-1].usage == streams["whole"][-1].usage

            # streamed without usage: none comes, and one [DONE] ends it
            body = {"model": "mock", "messages": chat("split-c" + "x" * 300), "max_tokens": 5}
            raw = await raw_stream(split, body)
            events = [e for e in raw.split("\n\n") if e]
            assert events[-1] == "data: [DONE]" and raw.count("[DONE]") == 1
            payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
            assert all(p["choices"] and "usage" not in p and "prompt_token_ids" not in p for p in payloads)
            text = "".join(p["choices"][0]["delta"].get("content", "") for p in payloads)
            assert text == PLACEHOLDER_TEXT[:5]

            # a first token that ends the answer (EOS): the answer is the first part's alone
            ended = {
                name: await client.chat.completions.create(
                    model="mock-eos", messages=chat(f"{name:5}-d" + "x" * 300), max_tokens=9
                )
                for name, client in clients.items()
            }
            one, other = ended["split"].choices[0], ended["whole"].choices[0]
            assert one.finish_reason == other.finish_reason == "stop"
            assert one.message.content == other.message.content == ""
            assert ended["split"].usage == ended["whole"].usage
            eos_stream = await stream_chunks(
                clients["split"],
                model="mock-eos",
                messages=chat("split-e" + "x" * 300),
                max_tokens=9,
                stream_options={"include_usage": True},
            )
            assert [c.choices[0].finish_reason for c in eos_stream if c.choices][-1] == "stop"
            assert eos_stream[-1].usage is not None and eos_stream[-1].usage.completion_tokens == 1

            # Anthropic's Messages API: its relay reads the joined answer as a worker's
            for name, gateway in (("split", split), ("whole", whole)):
                claude = anthropic.AsyncAnthropic(base_url=gateway.url, api_key="none", max_retries=0)
                try:
                    reply = await claude.messages.create(
                        model="mock", max_tokens=6, messages=chat(f"{name:5}-f" + "x" * 300)
                    )
                    assert reply.content[0].text == PLACEHOLDER_TEXT[:6] and reply.usage.output_tokens == 6
                    events = [
                        event
                        async for event in await claude.messages.create(
                            model="mock", max_tokens=6, messages=chat(f"{name:5}-g" + "x" * 300), stream=True
                        )
                    ]
                    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
                    assert text == PLACEHOLDER_TEXT[:6]
                    assert [e.usage.output_tokens for e in events if e.type == "message_delta"] == [6]
                finally:
                    await claude.close()
        finally:
            for client in clients.values():
                await client.close()
        prefix = split.gateway.turns._request_id_prefix
        status, metrics = await split.get("/metrics")
        assert status == 200 and re.search(r"^kvgate_split_turns_total 7\.0$", metrics, re.M)

    seen = requests_seen(worker)
    split_turns = [parts for rid, parts in seen.items() if rid.startswith(f"req-{prefix}")]
    whole_turns = [parts for rid, parts in seen.items() if not rid.startswith(f"req-{prefix}")]
    assert len(split_turns) == 5 and len(whole_turns) == 4
    for parts, max_tokens in zip(split_turns, (9, 7, 5, 6, 6), strict=True):
        (prompt, out0, first_max, first_priority), (decode_prompt, out1, rest_max, decode_priority) = parts
        assert (out0, first_max, first_priority) == (0, 1, 0)
        assert (decode_prompt, out1, rest_max, decode_priority) == (prompt + 1, 1, max_tokens - 1, -11)
    assert [[(p[1], p[2], p[3]) for p in parts] for parts in whole_turns] == [
        [(0, 9, 0)],
        [(0, 7, 0)],
        [(0, 6, 0)],
        [(0, 6, 0)],
    ]


async def test_with_split_fcfs_a_first_come_first_served_worker_with_a_host_tier_gets_turns_split(
    cluster: Cluster, nats_url: str, namespace: str
) -> None:
    """With `split_fcfs`, a turn to a first-come-first-served worker with a host tier goes as its prompt
    (one token) and its decode (the prompt and the first token, the rest of the output), both at the
    default priority 0, and reads as the one request's answer; a worker without a tier gets it whole."""
    for worker_id, model, extra in (("ft0", "m-tier", ["--host-blocks", "512"]), ("fn0", "m-none", [])):
        cluster.worker(worker_id, "mock", "--model", model, "--log-level", "DEBUG", *extra)
    for worker_id in ("ft0", "fn0"):
        await asyncio.to_thread(cluster.workers[worker_id].wait_http, "/health", 60.0)
    router_config = RouterConfig(split_fcfs=True)
    async with running_gateway(nats_url, namespace, "gw-fcfs", router_config=router_config) as gw:
        await gw.wait_ready(workers=2)
        assert gw.router.decode_priority("ft0") == 0 and gw.router.decode_priority("fn0") is None
        client = sdk(gw)
        prompt_tokens = {"m-tier": 0, "m-none": 0}
        try:
            for model in ("m-tier", "m-none"):
                whole = await client.chat.completions.create(
                    model=model, messages=chat(f"{model}-a" + "x" * 300), max_tokens=9
                )
                assert whole.choices[0].message.content == PLACEHOLDER_TEXT[:9]
                assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 9
                chunks = await stream_chunks(
                    client,
                    model=model,
                    messages=chat(f"{model}-b" + "x" * 300),
                    max_tokens=7,
                    stream_options={"include_usage": True},
                )
                choices = [c.choices[0] for c in chunks if c.choices]
                assert "".join(c.delta.content or "" for c in choices) == PLACEHOLDER_TEXT[:7]
                assert sum(1 for c in choices if c.delta.role) == 1
                assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7
                prompt_tokens[model] = whole.usage.prompt_tokens + chunks[-1].usage.prompt_tokens
        finally:
            await client.close()
        # the worker counts a turn's prompt once: its decode part continues it, no prompt of its own
        # (counted once the answer is sent: the last count may lag the client)
        for worker_id, model in (("ft0", "m-tier"), ("fn0", "m-none")):
            worker, name = cluster.workers[worker_id], "kvgate_worker_prompt_tokens_total"
            want = prompt_tokens[model]

            async def counted(w: Proc = worker, n: str = name, want: int = want) -> bool:
                return await worker_metric(w, n) >= want

            await until(counted, 60.0, f"{worker_id}'s prompt tokens counted")
            assert await worker_metric(worker, name) == want

    split = list(requests_seen(cluster.workers["ft0"]).values())
    assert len(split) == 2
    for parts, max_tokens in zip(split, (9, 7), strict=True):
        (prompt, out0, first_max, first_priority), (decode_prompt, out1, rest_max, decode_priority) = parts
        assert (out0, first_max, first_priority) == (0, 1, 0)
        assert (decode_prompt, out1, rest_max, decode_priority) == (prompt + 1, 1, max_tokens - 1, 0)
    whole_turns = list(requests_seen(cluster.workers["fn0"]).values())
    assert [[(p[1], p[2], p[3]) for p in parts] for parts in whole_turns] == [[(0, 9, 0)], [(0, 7, 0)]]


async def test_a_decode_in_slices_reads_as_the_unsplit_answer(
    cluster: Cluster, nats_url: str, namespace: str
) -> None:
    """With `decode_slice_tokens`, a turn to a first-come-first-served worker with a host tier goes as
    its prompt part and then its decode in parts of at most that many tokens, each continuing the
    output so far, all at priority 0; the answers, whole and streamed, equal an unsplit gateway's (text,
    finish reason, usage), also where EOS ends the answer inside a slice."""
    tier = ["--host-blocks", "512", "--log-level", "DEBUG"]
    cluster.worker("sl0", "mock", "--model", "m-slices", *tier)
    cluster.worker("sle0", "mock", "--model", "m-slices-eos", "--eos-after", "6", *tier)
    for worker_id in ("sl0", "sle0"):
        await asyncio.to_thread(cluster.workers[worker_id].wait_http, "/health", 60.0)
    sliced_gw = running_gateway(
        nats_url, namespace, "gw-sliced", router_config=RouterConfig(split_fcfs=True, decode_slice_tokens=4)
    )
    whole_gw = running_gateway(nats_url, namespace, "gw-unsplit", split_turns=False)
    async with sliced_gw as sliced, whole_gw as whole:
        await sliced.wait_ready(workers=2)
        await whole.wait_ready(workers=2)
        assert sliced.router.decode_slice_tokens("sl0") == 4 and whole.router.decode_priority("sl0") is None
        clients = {"split": sdk(sliced), "whole": sdk(whole)}
        try:
            for model, tokens in (("m-slices", 11), ("m-slices-eos", 11)):
                answers = {
                    name: await client.chat.completions.create(
                        model=model, messages=chat(f"{name:5}-{model}-a" + "x" * 300), max_tokens=tokens
                    )
                    for name, client in clients.items()
                }
                a, b = answers["split"], answers["whole"]
                assert a.choices[0].message.content == b.choices[0].message.content
                assert a.choices[0].finish_reason == b.choices[0].finish_reason
                assert a.usage == b.usage and a.usage is not None
                streams = {
                    name: await stream_chunks(
                        client,
                        model=model,
                        messages=chat(f"{name:5}-{model}-b" + "x" * 300),
                        max_tokens=tokens,
                        stream_options={"include_usage": True},
                    )
                    for name, client in clients.items()
                }
                texts = []
                for chunks in streams.values():
                    choices = [c.choices[0] for c in chunks if c.choices]
                    texts.append("".join(c.delta.content or "" for c in choices))
                    assert sum(1 for c in choices if c.delta.role) == 1
                    assert len([c.finish_reason for c in choices if c.finish_reason]) == 1
                    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
                assert texts[0] == texts[1] == a.choices[0].message.content
                assert streams["split"][-1].usage == streams["whole"][-1].usage
            assert answers["split"].choices[0].finish_reason == "stop"  # EOS as token 6, in a slice
            assert answers["split"].usage.completion_tokens == 7
        finally:
            for client in clients.values():
                await client.close()
        prefix = sliced.gateway.turns._request_id_prefix

    def parts(worker_id: str) -> list[list[tuple[int, int, int]]]:
        seen = requests_seen(cluster.workers[worker_id])
        return [[p[1:] for p in ps] for rid, ps in seen.items() if rid.startswith(f"req-{prefix}")]

    # (output so far, max_tokens, priority) of each part: 1 + 4 + 4 + 2 tokens; with EOS as the 7th
    # token (in the third part), no fourth part
    assert parts("sl0") == [[(0, 1, 0), (1, 4, 0), (5, 4, 0), (9, 2, 0)]] * 2
    assert parts("sle0") == [[(0, 1, 0), (1, 4, 0), (5, 4, 0)]] * 2


async def test_a_slice_that_fails_ends_the_answer_with_an_error(
    cluster: Cluster, nats_url: str, namespace: str
) -> None:
    """The worker dies while a later slice of the decode runs: a stream begun ends with an error event,
    a whole answer is a 502; neither hangs."""
    slow = ["--speedup", "0.05", "--host-blocks", "512", "--log-level", "DEBUG"]
    cluster.worker("sld0", "mock", "--model", "m-stream", *slow)
    cluster.worker("sld1", "mock", "--model", "m-whole", *slow)
    for worker_id in ("sld0", "sld1"):
        await asyncio.to_thread(cluster.workers[worker_id].wait_http, "/health", 60.0)
    config = RouterConfig(split_fcfs=True, decode_slice_tokens=3)
    async with running_gateway(
        nats_url, namespace, "gw-slfail", router_config=config, failure_backoff_s=0.0
    ) as gw:
        await gw.wait_ready(workers=2)
        client = sdk(gw)

        async def third_part_taken(worker: Proc) -> None:
            def taken() -> bool:
                return any(p[1] >= 4 for parts in requests_seen(worker).values() for p in parts)

            await until(taken, 60.0, "the decode's second slice at the worker")

        try:
            stream = await client.chat.completions.create(
                model="m-stream", messages=chat("s" * 200), max_tokens=2000, stream=True
            )
            chunks = stream.__aiter__()
            await chunks.__anext__()
            await third_part_taken(cluster.workers["sld0"])
            cluster.workers["sld0"].kill()
            with pytest.raises(openai.APIError):
                async for _chunk in _bounded(chunks, 60.0):
                    pass

            whole = asyncio.create_task(
                client.chat.completions.create(model="m-whole", messages=chat("w" * 200), max_tokens=2000)
            )
            await third_part_taken(cluster.workers["sld1"])
            cluster.workers["sld1"].kill()
            with pytest.raises(openai.APIStatusError) as failed:
                await asyncio.wait_for(whole, 60.0)
            assert failed.value.status_code == 502
        finally:
            await client.close()


async def test_a_prompt_that_does_not_fit_preempts_another_sessions_decode(
    cluster: Cluster, nats_url: str, namespace: str
) -> None:
    """A long answer decodes (its decode part, at priority -11) on a worker of 128 blocks; a prompt of
    ~100 blocks cannot fit beside it. Sent as a prompt part at priority 0, it preempts the decode and
    its first token comes while the long answer is far from done (1,400 tokens at ~0.3 s each: it
    would wait ~7 minutes for them in a first-come-first-served queue). Known by construction: the
    worker counts the preemption."""
    await start_workers(cluster, ("pre0", ["--num-blocks", "128", "--speedup", "0.02"]))
    worker = cluster.workers["pre0"]
    async with running_gateway(nats_url, namespace, "gw-preempt") as gw:
        await gw.wait_ready(workers=1)
        client = sdk(gw)
        try:
            long_stream = await client.chat.completions.create(
                model="mock", messages=chat("a" * 500), max_tokens=1400, stream=True
            )
            long_chunks = long_stream.__aiter__()
            await long_chunks.__anext__()  # its first token is out: its decode part follows

            def decoding() -> bool:
                return any(p[1] == 1 for parts in requests_seen(worker).values() for p in parts)

            await until(decoding, 60.0, "the long answer's decode part at the worker")
            assert await worker_metric(worker, "kvgate_worker_preemptions") == 0
            big = await client.chat.completions.create(
                model="mock", messages=chat("b" * 1600), max_tokens=5, stream=True
            )
            first = await asyncio.wait_for(big.__aiter__().__anext__(), 120.0)
            assert first.choices and first.choices[0].delta.role == "assistant"
            assert await worker_metric(worker, "kvgate_worker_preemptions") >= 1
            await big.close()
            await long_stream.close()
        finally:
            await client.close()


async def test_a_prompt_that_does_not_fit_cuts_a_running_slice(
    cluster: Cluster, nats_url: str, namespace: str
) -> None:
    """On a first-come-first-served worker of 64 blocks with a host tier, a streamed answer decodes in
    slices of 30 tokens; a second turn's prompt (~36 blocks) does not fit beside the running slice
    (~37 blocks of prompt and output), so the gateway cuts that slice (`cut_slices`: the router names
    it from the worker's load report, the gateway closes its stream and the worker aborts it). The
    answer goes on from the output relayed so far and reads as the unsplit one; the second turn is
    answered."""
    slow = ["--num-blocks", "64", "--host-blocks", "512", "--speedup", "0.2", "--log-level", "DEBUG"]
    cluster.worker("cut0", "mock", "--model", "m-cut", *slow)
    await asyncio.to_thread(cluster.workers["cut0"].wait_http, "/health", 60.0)
    worker = cluster.workers["cut0"]
    config = RouterConfig(split_fcfs=True, decode_slice_tokens=30)
    async with running_gateway(nats_url, namespace, "gw-cut", router_config=config) as gw:
        await gw.wait_ready(workers=1)
        assert gw.router.decode_slice_tokens("cut0") == 30 and gw.router.slices is not None
        client = sdk(gw)
        try:
            long_stream = await client.chat.completions.create(
                model="m-cut", messages=chat("a" * 540), max_tokens=120, stream=True
            )
            chunks = long_stream.__aiter__()
            first = await chunks.__anext__()

            def second_slice() -> bool:  # a slice after the first decode part: output so far 31
                return any(p[1] > 1 for parts in requests_seen(worker).values() for p in parts)

            await until(second_slice, 60.0, "the long answer's second slice at the worker")

            def reported_running() -> bool:  # the router sees the slice's blocks in use there
                report = gw.router.load.workers["cut0"].report
                return report is not None and report.running == 1 and report.used_blocks > 32

            await until(reported_running, 60.0, "the slice running in the worker's load report")
            # and the gateway said it runs (its first token came): a running slice, not a queued one
            slices = gw.router.slices
            await until(lambda: bool(slices.running_on("cut0")), 60.0, "the slice known to run")
            other = await client.chat.completions.create(
                model="m-cut", messages=chat("b" * 540), max_tokens=3
            )
            assert other.choices[0].message.content == PLACEHOLDER_TEXT[:3]
            rest = [chunk async for chunk in _bounded(chunks, 120.0)]
        finally:
            await client.close()
        assert gw.router.slices.cut_total >= 1 and len(gw.gateway.turns.slice_cuts) == 0
        status, metrics = await gw.get("/metrics")
        assert status == 200 and re.search(r"^kvgate_slices_cut_total [1-9]", metrics, re.M)
        prefix = gw.gateway.turns._request_id_prefix
    finishes = [
        c.choices[0].finish_reason for c in [first, *rest] if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["length"]
    text = "".join(c.choices[0].delta.content or "" for c in [first, *rest] if c.choices)
    assert text == (PLACEHOLDER_TEXT * 2)[:120]
    # the long answer's parts (output so far, max_tokens): one ends short of its size where it was cut,
    # and the next goes on from there
    parts = next(
        [p[1:3] for p in ps]
        for rid, ps in requests_seen(worker).items()
        if rid.startswith(f"req-{prefix}") and len(ps) > 2
    )
    assert parts[0] == (0, 1) and parts[-1][0] + parts[-1][1] == 120
    assert any(after[0] < before[0] + before[1] for before, after in itertools.pairwise(parts))


async def test_a_long_prompt_goes_in_prefill_pieces_first(
    cluster: Cluster, nats_url: str, namespace: str
) -> None:
    """On a first-come-first-served worker with a host tier, a prompt longer than a prefill piece
    (`prefill_piece_tokens`, 200 tokens here) goes first in pieces: requests for its first 200, 400, ...
    tokens with max_tokens 1, each sent when the one before ended, then the prompt part and the decode.
    The answers, whole and streamed, read as unsplit ones; their usage reports what was cached before
    the first piece (nothing: fresh prompts), not what the pieces computed."""
    cluster.worker("pc0", "mock", "--model", "m-pc", "--host-blocks", "512", "--log-level", "DEBUG")
    await asyncio.to_thread(cluster.workers["pc0"].wait_http, "/health", 60.0)
    worker = cluster.workers["pc0"]
    config = RouterConfig(split_fcfs=True, prefill_piece_tokens=200)
    async with running_gateway(nats_url, namespace, "gw-pc", router_config=config) as gw:
        await gw.wait_ready(workers=1)
        client = sdk(gw)
        try:
            whole = await client.chat.completions.create(model="m-pc", messages=chat("p" * 900), max_tokens=5)
            stream = await client.chat.completions.create(
                model="m-pc",
                messages=chat("q" * 900),
                max_tokens=5,
                stream=True,
                stream_options={"include_usage": True},
            )
            chunks = [chunk async for chunk in _bounded(stream.__aiter__(), 60.0)]
        finally:
            await client.close()
        status, metrics = await gw.get("/metrics")
        prefix = gw.gateway.turns._request_id_prefix
    assert whole.choices[0].message.content == PLACEHOLDER_TEXT[:5]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == PLACEHOLDER_TEXT[:5]
    usages = [whole.usage, chunks[-1].usage]
    for usage in usages:
        assert usage is not None and usage.completion_tokens == 5 and usage.prompt_tokens > 900
        assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 0
    turns = [ps for rid, ps in requests_seen(worker).items() if rid.startswith(f"req-{prefix}")]
    assert len(turns) == 2
    for parts, usage in zip(turns, usages, strict=True):
        assert usage is not None
        pieces = [part for part in parts if part[0] < usage.prompt_tokens]
        assert [p[0] for p in pieces] == [200, 400, 600, 800] and all(p[1:3] == (0, 1) for p in pieces)
        assert parts[len(pieces)] == (usage.prompt_tokens, 0, 1, 0)  # then the prompt part, the decode
    assert status == 200 and re.search(r"^kvgate_prefill_pieces_total 8", metrics, re.M)


async def _decode_part_taken(worker: Proc) -> None:
    def taken() -> bool:
        return any(p[1] == 1 for parts in requests_seen(worker).values() for p in parts)

    await until(taken, 60.0, "the decode part at the worker")


async def test_a_decode_part_that_fails_ends_the_answer_with_an_error(
    cluster: Cluster, nats_url: str, namespace: str
) -> None:
    """The worker dies while the decode part runs (a slow worker, killed once it took it): a stream
    begun ends with an error event, a whole answer is a 502 JSON error; neither hangs. Bad input is
    still a clean 400."""
    slow = ["--speedup", "0.05"]  # ~0.1 s a token: the decode parts of 2,000 tokens outlast the test
    await start_workers(
        cluster, ("die0", ["--model", "m-stream", *slow]), ("die1", ["--model", "m-whole", *slow])
    )
    async with running_gateway(nats_url, namespace, "gw-fail", failure_backoff_s=0.0) as gw:
        await gw.wait_ready(workers=2)
        client = sdk(gw)
        try:
            for body, param in (
                ({"max_tokens": 0}, "max_tokens"),
                ({"max_tokens": 5, "priority": "high"}, "priority"),
                ({"max_tokens": 5, "return_token_ids": "yes"}, "return_token_ids"),
            ):
                with pytest.raises(openai.BadRequestError) as refused:
                    await client.chat.completions.create(
                        model="m-stream", messages=chat("hi"), extra_body=body
                    )
                assert refused.value.status_code == 400 and refused.value.body["param"] == param

            stream = await client.chat.completions.create(
                model="m-stream", messages=chat("s" * 200), max_tokens=2000, stream=True
            )
            chunks = stream.__aiter__()
            await chunks.__anext__()
            await _decode_part_taken(cluster.workers["die0"])
            cluster.workers["die0"].kill()
            with pytest.raises(openai.APIError):
                async for _chunk in _bounded(chunks, 60.0):
                    pass

            whole = asyncio.create_task(
                client.chat.completions.create(model="m-whole", messages=chat("w" * 200), max_tokens=2000)
            )
            await _decode_part_taken(cluster.workers["die1"])
            cluster.workers["die1"].kill()
            with pytest.raises(openai.APIStatusError) as failed:
                await asyncio.wait_for(whole, 60.0)
            assert failed.value.status_code == 502
        finally:
            await client.close()


async def _bounded(chunks: AsyncIterator[Any], timeout_s: float) -> AsyncIterator[Any]:
    while True:
        try:
            yield await asyncio.wait_for(chunks.__anext__(), timeout_s)
        except StopAsyncIteration:
            return
