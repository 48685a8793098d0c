"""`kvgate loadgen` as a real process: against `kvgate up`, trace replay, Ctrl-C, compare, bad input."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import sys
from collections import defaultdict
from collections.abc import AsyncIterator
from pathlib import Path

import matplotlib.image
import pytest

from gateway.cli import main
from loadgen.charts import CHARTS
from loadgen.replay import think_delay_s
from loadgen.trace import load_trace
from tests.kvgate_up import running_kvgate_up_async
from tests.loadgen.conftest import ROOT, TRACES, Served, run_loadgen

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SUMMARY_KEYS = (
    "requests", "completed", "errors", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "itl_p50_ms",
    "e2e_p50_ms", "output_tok_s", "cache_hit_rate", "sessions",
)  # fmt: skip


def assert_charts(out: Path) -> None:
    for name in CHARTS.values():
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        image = matplotlib.image.imread(out / name)
        assert image.shape[0] > 100 and image.shape[1] > 100


@pytest.fixture
async def mock_gateway(tmp_path: Path) -> AsyncIterator[str]:
    """`kvgate up --engine mock`: NATS, two zero-latency mock workers and the gateway, as a user runs it."""
    workers = "--speedup 1000 --num-blocks 4096"
    args = ["--engine", "mock", "--workers", "2", "--worker-args", workers]
    async with running_kvgate_up_async(args, tmp_path / "up.log") as url:
        yield url


@pytest.mark.slow
async def test_the_defaults_fit_the_default_server(tmp_path: Path) -> None:
    """`kvgate loadgen` with its defaults against `kvgate up --engine mock` with its defaults (a free
    port; 20 s instead of 60): the workload is sized to the workers' context, so nothing is refused."""
    async with running_kvgate_up_async(["--engine", "mock"], tmp_path / "up.log") as url:
        run = await run_loadgen(["--url", url, "--no-progress", "--duration", "20"], timeout=150)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = run.summary()
    assert summary["errors"] == 0 and summary["completed"] > 0, summary
    assert summary["sessions_completed"] > 0 and summary["ended_by"] == "duration"
    plan = run.stderr.splitlines()[0]  # said up front, in one line
    assert "max_model_len 16384" in plan and "the run ends after 20 s (--duration)" in plan


@pytest.mark.slow
async def test_agentic_run_against_kvgate_up_writes_results_report_and_charts(
    mock_gateway: str, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    run = await run_loadgen(
        ["--url", mock_gateway, "--workload", "agentic", "--rate", "4", "--duration", "15", "--warmup", "1",
         "--agent-types", "2", "--tool-time", "lognormal:0.3,0.5,max=1", "--system-len", "const:2000",
         "--tool-result-len", "lognormal:200,1,max=2000", "--output-len", "lognormal:24,0.5,min=2,max=64",
         "--turns", "const:6", "--out", str(out), "--no-progress"],
        timeout=90,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    summary = results["summary"]
    assert set(SUMMARY_KEYS) <= summary.keys()
    assert summary == run.summary()
    assert summary["completed"] > 50 and summary["errors"] == 0
    assert summary["sessions"] > 20 and summary["sessions_completed"] > 5
    assert 0 < summary["ttft_p50_ms"] <= summary["ttft_p90_ms"] <= summary["ttft_p99_ms"]
    assert summary["output_tok_s"] > 0 and summary["itl_p50_ms"] is not None
    assert summary["cache_hit_rate"] > 0.3  # each turn extends the last: the worker's cache must hit
    rows = results["requests"]
    assert len(rows) == summary["requests"] + summary["warmup_requests"]
    assert all(r["ok"] and r["prompt_tokens"] > 0 for r in rows)
    assert all(r["worker"] in ("worker-0", "worker-1") for r in rows)  # the gateway's x-kvgate-worker
    assert any(r["tool_result"] for r in rows) and results["sessions"]
    assert results["config"]["workload"] == "agentic" and results["config"]["model"] == "mock"
    report = (out / "report.md").read_text()
    assert "TTFT p50" in report and "ttft_cdf.png" in report
    assert_charts(out)


async def test_trace_replay_is_closed_loop_per_session(sse: Served, tmp_path: Path) -> None:
    trace = TRACES / "cc_sessions_sample.jsonl"
    limit, scale, cap = 60, 100.0, 0.4
    out = tmp_path / "replay"
    run = await run_loadgen(
        ["--url", sse.url, "--trace", str(trace), "--limit", str(limit), "--rate-scale", str(scale),
         "--max-think-s", str(cap), "--duration", "0", "--out", str(out), "--no-progress"]
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    rows = results["requests"]
    assert len(rows) == limit and all(r["ok"] for r in rows)
    trace_rows = {(r.session_id, r.turn): r for r in load_trace(trace, limit)}
    sessions = defaultdict(list)
    for row in rows:
        sessions[row["session_id"]].append(row)
    assert len(sessions) == len({r.session_id for r in trace_rows.values()}) > 5
    t0 = min(r.timestamp for r in trace_rows.values())
    for session_id, turns in sessions.items():
        turns.sort(key=lambda r: r["turn"])
        first = trace_rows[(session_id, 0)]
        assert turns[0]["start"] >= (first.timestamp - t0) / 1000 / scale - 1e-3  # open-loop arrival
        for previous, row in itertools.pairwise(turns):
            expected = think_delay_s(trace_rows[(session_id, row["turn"])], cap, scale)
            assert row["delay"] == pytest.approx(expected)
            assert row["start"] >= previous["end"] + expected - 1e-3  # the closed-loop rule
            assert row["tool_result"] == (trace_rows[(session_id, previous["turn"])].stop == "tool_use")
    # the prompt text is the trace's: input_length characters (one character per trace token)
    sent = defaultdict(list)
    for request in sse.server.requests:
        sent[request["session"]].append(request["content_chars"])
    for session_id, turns in sessions.items():
        assert sent[session_id] == [trace_rows[(session_id, r["turn"])].input_length for r in turns]


async def test_ctrl_c_stops_cleanly_and_keeps_what_was_measured(sse: Served, tmp_path: Path) -> None:
    out = tmp_path / "interrupted"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway.cli", "loadgen", "--url", sse.url, "--workload", "chat",
        "--rate", "20", "--duration", "60", "--max-context", "3000", "--think-time", "const:0.05",
        "--out", str(out), "--no-progress",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(30):
            while len(sse.server.requests) < 20:
                await asyncio.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130, stderr.decode()[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["summary"]["interrupted"] is True
    assert results["summary"]["completed"] >= 20 and results["summary"]["duration_s"] < 30
    assert "interrupted" in (out / "report.md").read_text()
    assert_charts(out)


async def test_compare_writes_a_side_by_side_report(sse: Served, tmp_path: Path) -> None:
    for name, extra in (("with-session", []), ("no-session", ["--no-session-header"])):
        run = await run_loadgen(
            ["--url", sse.url, "--workload", "prefix", "--requests", "40", "--rate", "0", "--prefixes", "2",
             "--out", str(tmp_path / name), "--no-progress", *extra]
        )  # fmt: skip
        assert run.returncode == 0, run.stderr[-2000:]
        assert run.summary()["completed"] == 40
    out = tmp_path / "cmp"
    argv = [
        "loadgen",
        "compare",
        str(tmp_path / "with-session"),
        str(tmp_path / "no-session"),
        "--out",
        str(out),
    ]
    assert main(argv) == 0  # in process: nothing to serve
    report = (out / "report.md").read_text()
    assert "| with-session | no-session |" in report and "TTFT p50" in report and "x)" in report
    assert_charts(out)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--turns", "gauss:3"], "unknown distribution"),
        (["--trace", "/nonexistent/trace.jsonl"], "No such file"),
        (["--rate", "-1"], "--rate must be >= 0"),
        (["--rate", "nan"], "--rate must be >= 0"),
        (["--warmup", "nan"], "--warmup must be >= 0"),
        (["--timeout", "nan"], "--timeout must be > 0"),
        (["--rate", "0"], "needs --requests"),
        (["--concurrency", "0"], "--concurrency must be >= 1"),
        (["--url", "http://127.0.0.1:1"], "pass --model"),
        (["compare", "/nonexistent"], "at least two"),
        (["compare", "/nonexistent", "/tmp"], "no results.json"),
        (["frobnicate"], "unknown action"),
    ],
)
def test_bad_input_is_a_clear_error(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:  # in process: a child per case would cost seconds of imports each
        code = main(["loadgen", "--no-progress", "--duration", "1", *args])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
