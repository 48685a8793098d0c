"""The driver against the in-process SSE server: limits, the session timing rule, errors, interrupts."""

from __future__ import annotations

import asyncio
import itertools
import json
import statistics
from collections import defaultdict

import pytest
from aiohttp import web

from loadgen.client import StreamClient
from loadgen.distributions import parse_distribution
from loadgen.driver import Driver, RunConfig
from loadgen.metrics import Recorder, RequestRecord
from loadgen.replay import TraceWorkload
from loadgen.trace import TraceContent, load_trace
from loadgen.workloads import AgenticConfig, AgenticWorkload
from tests.loadgen.conftest import TRACES, Served
from tests.polling import until
from tests.serving import serving


def _workload(turns: str = "const:4", tool_time: str = "const:0.05", rate: float = 50.0) -> AgenticWorkload:
    config = AgenticConfig(
        agent_types=2,
        turns=parse_distribution(turns),
        tool_time_s=parse_distribution(tool_time),
        system_tokens=parse_distribution("const:1500"),
        tool_result_tokens=parse_distribution("const:100"),
        task_tokens=parse_distribution("const:100"),
        output_tokens=parse_distribution("const:8"),
    )
    return AgenticWorkload(config, rate=rate, seed=7)


async def _drive(url: str, config: RunConfig, **workload: object) -> tuple[Driver, Recorder]:
    recorder = Recorder(warmup_s=config.warmup_s)
    async with StreamClient(url, "mock-model") as client:
        driver = Driver(client, _workload(**workload), config, recorder)
        await asyncio.wait_for(driver.run(), 30)
    return driver, recorder


def _by_session(rows: list[RequestRecord]) -> dict[str, list[RequestRecord]]:
    sessions: dict[str, list[RequestRecord]] = defaultdict(list)
    for row in rows:
        sessions[row.session_id].append(row)
    return sessions


async def test_request_budget_and_session_timing_rule(sse: Served) -> None:
    _, recorder = await _drive(sse.url, RunConfig(duration_s=None, requests=30))
    rows = recorder.requests
    assert len(rows) == 30 == len(sse.server.requests) and all(r.ok for r in rows)
    for turns in _by_session(rows).values():
        assert [r.turn for r in turns] == list(range(len(turns)))
        for previous, row in itertools.pairwise(turns):
            assert row.delay == 0.05 and row.start >= previous.end + row.delay - 1e-6
    summary = recorder.summary(1.0)
    assert summary["completed"] == 30 and summary["output_tokens"] == 30 * 8
    assert 0 < summary["cache_hit_rate"] < 1  # later turns reuse the prefix the server saw
    tool_turns = [h for h in sse.server.requests if h["tool_call"] == "pending"]
    assert len(tool_turns) == sum(1 for r in rows if r.turn > 0)
    assert all(h["session"] for h in sse.server.requests)


async def test_failed_turn_ends_its_session_and_is_counted_with_its_status(sse: Served) -> None:
    sse.server.fail_every = 3
    _, recorder = await _drive(sse.url, RunConfig(duration_s=None, requests=20))
    failed = [r for r in recorder.requests if not r.ok]
    assert failed and all(r.status == 503 and "injected failure" in (r.error or "") for r in failed)
    for turns in _by_session(recorder.requests).values():
        assert all(r.ok for r in turns[:-1])  # nothing is sent after a failure
    summary = recorder.summary(1.0)
    assert summary["errors"] == len(failed) and summary["error_statuses"] == {"503": len(failed)}
    assert not any(s.completed for s in recorder.sessions if s.turns < 4)


async def test_duration_stops_waiting_sessions_and_warmup_is_left_out(sse: Served) -> None:
    config = RunConfig(duration_s=1.0, warmup_s=0.3)
    driver, recorder = await _drive(sse.url, config, turns="const:50", tool_time="const:1", rate=20.0)
    # sessions sleeping in tool time were cancelled, not waited for (their 50 turns take 50 s of tool
    # time alone); the rest of the bound is room for a loaded machine
    assert driver.elapsed() < 20
    assert all(r.start < 1.0 + 1e-3 for r in recorder.requests)
    summary = recorder.summary(driver.elapsed())
    assert summary["warmup_requests"] == sum(1 for r in recorder.requests if r.start < 0.3) > 0
    assert summary["requests"] == len(recorder.requests) - summary["warmup_requests"]
    assert summary["sessions"] == len(recorder.sessions) and summary["sessions_completed"] == 0


async def test_closed_loop_concurrency_and_interrupt(sse: Served) -> None:
    recorder = Recorder()
    async with StreamClient(sse.url, "mock-model") as client:
        driver = Driver(
            client, _workload(tool_time="const:0"), RunConfig(duration_s=None, concurrency=4), recorder
        )
        task = asyncio.ensure_future(driver.run())
        await until(lambda: len(recorder.requests) > 10, 30.0, "requests recorded")  # not a time slot
        driver.interrupt()
        await asyncio.wait_for(task, 30)
    assert driver.interrupted and recorder.in_flight == 0 and len(recorder.requests) > 10
    live = max(
        len({r.session_id for r in recorder.requests if r.start <= t <= r.end}) for t in (0.1, 0.2, 0.3)
    )
    assert live <= 4


async def test_trace_replay_shares_exactly_the_prefixes_the_trace_shares(sse: Served) -> None:
    rows = load_trace(TRACES / "mooncake_conversation_sample.jsonl", limit=200)
    seen: set[int] = set()
    shared = total = 0
    for row in rows:  # what an infinite prefix cache would hit, from the trace's hash ids
        prefix = 0
        while prefix < len(row.hash_ids) and row.hash_ids[prefix] in seen:
            prefix += 1
        shared += min(prefix * 512, row.input_length)
        total += row.input_length
        seen.update(row.hash_ids)
    workload = TraceWorkload(rows, TraceContent(), rate_scale=1000.0)
    recorder = Recorder()
    async with StreamClient(sse.url, "mock-model") as client:
        config = RunConfig(duration_s=None, max_concurrency=1)  # one at a time: the cache sees trace order
        await asyncio.wait_for(Driver(client, workload, config, recorder).run(), 60)
    summary = recorder.summary(1.0)
    assert summary["completed"] == 200 and shared / total > 0.05
    # the server's cache (16-character blocks, infinite) hits what the trace says is shared
    assert summary["cache_hit_rate"] == pytest.approx(shared / total, abs=0.01)


def test_a_wait_never_ends_before_its_deadline_under_uvloop() -> None:
    # uvloop's timers keep whole milliseconds against a loop clock read once per iteration: a bare
    # asyncio.sleep returned early about a third of the time here (by up to 1 ms on a loaded box), and
    # a closed-loop turn then started before its predecessor's end plus its delay
    uvloop = pytest.importorskip("uvloop")

    async def lateness() -> list[float]:
        driver = Driver(None, _workload(), RunConfig(duration_s=None), Recorder(warmup_s=0.0))  # type: ignore[arg-type]
        late = []
        for i in range(200):
            sum(range(20_000))  # work before the wait leaves the loop's clock behind
            deadline = driver.elapsed() + 0.0005 + (i % 7) * 0.0013
            await driver._wait_until(deadline)
            late.append(driver.elapsed() - deadline)
        return late

    assert min(uvloop.run(lateness())) >= 0


async def test_requests_in_flight_after_the_drain_are_recorded_unfinished_with_their_first_token() -> None:
    """A server that never ends a stream: every other request gets its first token first. The run ends
    after its duration, the requests in flight are cancelled after the drain and recorded as unfinished
    (not errors); the TTFT of those whose first token came counts, the others count in no TTFT but in
    the TTFT over the turns sent, at their wait."""
    release = asyncio.Event()
    received = 0

    async def hold(request: web.Request) -> web.StreamResponse:
        nonlocal received
        received += 1
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        if received % 2:
            delta = {"choices": [{"index": 0, "delta": {"content": "A"}, "finish_reason": None}]}
            await response.write(f"data: {json.dumps(delta)}\n\n".encode())
        await release.wait()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", hold)
    async with serving(app, handler_cancellation=True) as url:
        try:
            config = RunConfig(duration_s=0.5, drain_s=0.2)
            driver, recorder = await _drive(url, config, turns="const:4", rate=20.0)
        finally:
            release.set()
    rows = recorder.requests
    assert recorder.sent == received > 1 and len(rows) == received and recorder.in_flight == 0
    assert all(r.unfinished and not r.ok and r.e2e is None for r in rows)
    first = [r for r in rows if r.ttft is not None]
    assert first and len(first) < len(rows)  # the streams that had begun, and those that had not
    summary = recorder.summary(driver.elapsed())
    assert summary["errors"] == 0 and summary["completed"] == 0
    assert summary["unfinished"] == len(rows)
    assert summary["unfinished_before_first_token"] == len(rows) - len(first)
    assert summary["ttft_p50_ms"] == pytest.approx(1e3 * statistics.median(r.ttft for r in first), abs=1e-3)
    # over the turns sent, those still waiting count at their wait, which no first token came to end
    waits = [r.end - r.start for r in rows if r.ttft is None]
    sent = [r.ttft for r in first if r.ttft is not None] + waits
    assert summary["ttft_sent_p50_ms"] == pytest.approx(1e3 * statistics.median(sent), abs=1e-3)
    assert min(waits) > max(r.ttft for r in first if r.ttft is not None)
