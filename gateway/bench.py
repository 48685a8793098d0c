"""`kvgate bench gateway`: what the proxy costs, against calling the worker directly, in one run.

A real nats-server, one mock worker at (near) zero latency and the gateway, each its own process; the
client sends the same requests to the worker and through the gateway, interleaved so that both see
the same machine. Latency: sequential requests, overhead = gateway percentile - direct percentile.
Throughput: a fixed number of requests at a fixed concurrency, in alternating rounds (median).
CPU: the gateway process's CPU time during its own throughput rounds, per request.
With `--tracing`, a second gateway exports OpenTelemetry spans of every request (OTLP/HTTP to a sink
in this process) and its latency is measured in the same interleaving: the cost of tracing on.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.server
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator

import aiohttp
import numpy as np

from gateway.live_bench import cpu_seconds, stop_all
from gateway.natsd import NatsServer, free_port
from kvutil.child_process import spawn_tied
from kvutil.thread_server import served_in_thread

GOAL_OVERHEAD_MS_P50 = 1.0
GOAL_RPS_RATIO = 0.5
GOAL_CPU_MS_PER_REQUEST = 0.2  # the gateway's CPU per routed request (0.3 when streaming)
GOAL_CPU_MS_PER_STREAM = 0.3
GOAL_TRACING_MS_P50 = 0.1  # tracing on costs at most this over tracing off


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--requests", type=int, default=400, help="sequential requests per target")
    parser.add_argument(
        "--throughput-requests", type=int, default=2000, help="requests per target, all rounds"
    )
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight in throughput rounds")
    parser.add_argument("--rounds", type=int, default=5, help="alternating throughput rounds per target")
    parser.add_argument("--stream", action="store_true", help="stream the responses (SSE)")
    parser.add_argument("--max-tokens", type=int, default=4, help="max_tokens of every request")
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="also measure a gateway exporting OpenTelemetry spans, beside the plain one",
    )


def _spawn(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    # tracing only where asked: the environment's OTEL_* endpoint stays off the plain gateway
    base = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_EXPORTER_OTLP")}
    return spawn_tied(
        [sys.executable, "-m", "gateway.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**base, **(env or {})},
    )


class _SpanSink(http.server.BaseHTTPRequestHandler):
    """Accepts OTLP/HTTP exports and drops them (an empty protobuf message is a valid answer)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def _span_sink() -> contextlib.AbstractContextManager[str]:
    """A local OTLP/HTTP endpoint that drops what it gets: its base URL for the `with` block."""
    return served_in_thread(http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SpanSink))


@contextlib.contextmanager
def _processes(namespace: str, tracing: bool = False) -> Iterator[tuple[str, str, str | None, int]]:
    """(worker URL, gateway URL, traced gateway URL or None, the gateway's pid), torn down on exit."""
    procs: list[subprocess.Popen[bytes]] = []
    with NatsServer() as nats, _span_sink() as sink:
        try:
            worker_port, gateway_port = free_port(), free_port()
            procs.append(_spawn([
                "worker", "--engine", "mock", "--speedup", "100000", "--nats", nats.url,
                "--port", str(worker_port), "--namespace", namespace, "--worker-id", "bench-0",
            ]))  # fmt: skip
            procs.append(_spawn([
                "gateway", "--nats", nats.url, "--port", str(gateway_port), "--namespace", namespace,
                "--log-level", "WARNING",
            ]))  # fmt: skip
            traced = None
            if tracing:
                traced_port = free_port()
                procs.append(_spawn([
                    "gateway", "--nats", nats.url, "--port", str(traced_port), "--namespace", namespace,
                    "--log-level", "WARNING",
                ], env={"OTEL_EXPORTER_OTLP_ENDPOINT": sink}))  # fmt: skip
                traced = f"http://127.0.0.1:{traced_port}"
            gateway_pid = procs[1].pid
            yield f"http://127.0.0.1:{worker_port}", f"http://127.0.0.1:{gateway_port}", traced, gateway_pid
        finally:
            stop_all(procs)


async def wait_ready(http: aiohttp.ClientSession, worker: str, gateway: str, timeout_s: float = 60) -> str:
    """The worker's model once the gateway is ready (it sees a worker); TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(gateway + "/ready") as resp:
                if resp.status == 200:
                    async with http.get(worker + "/v1/models") as models:
                        return (await models.json())["data"][0]["id"]
        await asyncio.sleep(0.2)
    raise TimeoutError("the worker and gateway did not become ready")


class BenchClient:
    """Chat requests of a short prompt, each numbered (no two alike): one at a time (`one`), or from
    `concurrency` closed loops (`throughput`)."""

    def __init__(self, http: aiohttp.ClientSession, model: str, stream: bool, max_tokens: int) -> None:
        self.http = http
        self.model = model
        self.stream = stream
        self.max_tokens = max_tokens
        self.count = 0

    async def one(self, base: str) -> float:
        self.count += 1
        body = {
            "model": self.model,
            "messages": [{"role": "user", "content": f"request {self.count}: say something short"}],
            "max_tokens": self.max_tokens,
            "stream": self.stream,
        }
        start = time.perf_counter()
        async with self.http.post(base + "/v1/chat/completions", json=body) as resp:
            await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"{base} answered {resp.status}")
        return time.perf_counter() - start

    async def throughput(self, base: str, total: int, concurrency: int) -> float:
        left = total

        async def loop() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await self.one(base)

        start = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return total / (time.perf_counter() - start)


async def _measure(
    args: argparse.Namespace, worker: str, gateway: str, traced: str | None = None, gateway_pid: int = 0
) -> dict[str, float]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:
        model = await wait_ready(http, worker, gateway)
        if traced is not None:
            await wait_ready(http, worker, traced)
        client = BenchClient(http, model, args.stream, args.max_tokens)
        bases = [worker, gateway] if traced is None else [worker, gateway, traced]
        for base in bases:  # warm every path (connections, caches)
            for _ in range(50):
                await client.one(base)
        direct, through, through_traced = await _latencies(client, args.requests, worker, gateway, traced)
        rounds = await _throughput_rounds(client, args, worker, gateway, gateway_pid)
    d_ms, g_ms = np.array(direct) * 1e3, np.array(through) * 1e3
    extra = {}
    if through_traced:
        t_ms = np.array(through_traced) * 1e3
        extra = {
            "traced_ms_p50": round(float(np.percentile(t_ms, 50)), 3),
            "tracing_overhead_ms_p50": round(float(np.percentile(t_ms, 50) - np.percentile(g_ms, 50)), 3),
            "tracing_overhead_ms_p99": round(float(np.percentile(t_ms, 99) - np.percentile(g_ms, 99)), 3),
        }
    direct_rps, gateway_rps, gateway_cpu_s = rounds
    per_round = max(1, args.throughput_requests // args.rounds)
    return {
        **extra,
        "direct_rps": round(direct_rps, 1),
        "gateway_rps": round(gateway_rps, 1),
        "overhead_ms_p50": round(float(np.percentile(g_ms, 50) - np.percentile(d_ms, 50)), 3),
        "overhead_ms_p99": round(float(np.percentile(g_ms, 99) - np.percentile(d_ms, 99)), 3),
        "direct_ms_p50": round(float(np.percentile(d_ms, 50)), 3),
        "gateway_ms_p50": round(float(np.percentile(g_ms, 50)), 3),
        "direct_ms_p99": round(float(np.percentile(d_ms, 99)), 3),
        "gateway_ms_p99": round(float(np.percentile(g_ms, 99)), 3),
        "rps_ratio": round(gateway_rps / direct_rps, 3) if direct_rps else 0.0,
        "gateway_cpu_ms_per_request": round(gateway_cpu_s * 1e3 / (per_round * args.rounds), 4),
        "requests": args.requests,
        "concurrency": args.concurrency,
        "stream": args.stream,
    }


async def _latencies(
    client: BenchClient, requests: int, worker: str, gateway: str, traced: str | None
) -> tuple[list[float], list[float], list[float]]:
    """Seconds per request, one at a time: to the worker directly, through the gateway and through the
    traced gateway (if any), alternating, the traced one each second time first: no order bias."""
    direct, through, through_traced = [], [], []
    for i in range(requests):
        direct.append(await client.one(worker))
        if traced is not None and i % 2:
            through_traced.append(await client.one(traced))
        through.append(await client.one(gateway))
        if traced is not None and not i % 2:
            through_traced.append(await client.one(traced))
    return direct, through, through_traced


async def _throughput_rounds(
    client: BenchClient, args: argparse.Namespace, worker: str, gateway: str, gateway_pid: int
) -> tuple[float, float, float]:
    """Requests/s to the worker and through the gateway, the median of alternating short rounds (the
    machine's other load hits both alike), and the gateway process's CPU seconds in its own rounds."""
    per_round = max(1, args.throughput_requests // args.rounds)
    direct_runs, gateway_runs = [], []
    gateway_cpu_s = 0.0
    for _ in range(args.rounds):
        direct_runs.append(await client.throughput(worker, per_round, args.concurrency))
        cpu_before = cpu_seconds(gateway_pid) or 0.0
        gateway_runs.append(await client.throughput(gateway, per_round, args.concurrency))
        gateway_cpu_s += (cpu_seconds(gateway_pid) or 0.0) - cpu_before
    return float(np.median(direct_runs)), float(np.median(gateway_runs)), gateway_cpu_s


def run(args: argparse.Namespace) -> int:
    with _processes("bench" + uuid.uuid4().hex[:8], args.tracing) as (worker, gateway, traced, pid):
        result = asyncio.run(_measure(args, worker, gateway, traced, pid))
    result["goal_overhead_ms_p50"] = GOAL_OVERHEAD_MS_P50
    result["goal_rps_ratio"] = GOAL_RPS_RATIO
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"direct:  {result['direct_rps']:.0f} req/s, p50 {result['direct_ms_p50']:.2f} ms")
    print(f"gateway: {result['gateway_rps']:.0f} req/s, p50 {result['gateway_ms_p50']:.2f} ms")
    print(
        f"overhead p50 {result['overhead_ms_p50']:.3f} ms (goal <= {GOAL_OVERHEAD_MS_P50}), "
        f"p99 {result['overhead_ms_p99']:.3f} ms; gateway/direct rps {result['rps_ratio']:.2f} "
        f"(goal >= {GOAL_RPS_RATIO})"
    )
    cpu_goal = GOAL_CPU_MS_PER_STREAM if args.stream else GOAL_CPU_MS_PER_REQUEST
    print(f"gateway CPU {result['gateway_cpu_ms_per_request']:.3f} ms per request (goal <= {cpu_goal})")
    if "tracing_overhead_ms_p50" in result:
        print(
            f"tracing on: p50 {result['traced_ms_p50']:.2f} ms, {result['tracing_overhead_ms_p50']:+.3f} ms "
            f"over tracing off (goal <= {GOAL_TRACING_MS_P50}), "
            f"p99 {result['tracing_overhead_ms_p99']:+.3f} ms"
        )
    return 0
