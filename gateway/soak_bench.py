"""`kvgate bench soak`: what the gateway keeps per request, after warm-up.

A real nats-server, one mock worker and `kvgate gateway`, each its own process. Requests with a unique
session id each (the worst case for per-session state), a share of them refused for length (nothing
may be kept for those), at a fixed concurrency. The gateway's resident memory is read from /proc after
the warm-up and at the end: retained bytes per request = growth / requests after warm-up. Also
reported: the peak, and the resident memory at every tenth of the run (a plateau, or a line).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp

from gateway.live_bench import stop_all
from gateway.natsd import NatsServer, free_port
from kvutil.child_process import spawn_tied

GOAL_BYTES_PER_REQUEST = 1024
CONTEXT_BLOCKS = 256  # the worker's context: 256 blocks of 16 = 4,096 tokens


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--requests", type=int, default=6000, help="requests after the warm-up")
    parser.add_argument("--warmup", type=int, default=2000, help="requests before the first measurement")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (default 8)")
    parser.add_argument("--rejected-share", type=float, default=0.2, help="share over the context")
    parser.add_argument("--prompt-chars", type=int, default=2000, help="prompt length of accepted requests")
    parser.add_argument("--seed", type=int, default=0, help="which requests are refused (default 0)")
    parser.add_argument(
        "--cache-mb",
        type=float,
        default=16.0,
        help="the gateway's byte caps: --prompt-cache-mb and the session table's max_session_bytes (MiB)",
    )


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    return spawn_tied(
        [sys.executable, "-m", "gateway.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def _wait_ready(http: aiohttp.ClientSession, url: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            async with http.get(url + "/ready") as resp:
                if resp.status == 200 and (await resp.json()).get("workers", 0) >= 1:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    raise TimeoutError("the gateway did not become ready")


class Load:
    def __init__(self, url: str, args: argparse.Namespace) -> None:
        self.url = url
        self.args = args
        self.rng = random.Random(args.seed)
        self.statuses: dict[int, int] = {}

    def body(self) -> dict[str, object]:
        rejected = self.rng.random() < self.args.rejected_share
        chars = CONTEXT_BLOCKS * 16 * 3 if rejected else self.args.prompt_chars
        text = uuid.uuid4().hex * (chars // 32 + 1)  # unique: no prefix in any cache helps
        return {"model": "mock", "messages": [{"role": "user", "content": text[:chars]}], "max_tokens": 4}

    async def run(self, http: aiohttp.ClientSession, count: int) -> None:
        queue: asyncio.Queue[None] = asyncio.Queue()
        for _ in range(count):
            queue.put_nowait(None)

        async def worker() -> None:
            while not queue.empty():
                queue.get_nowait()
                headers = {"x-session-id": uuid.uuid4().hex}
                url = self.url + "/v1/chat/completions"
                async with http.post(url, json=self.body(), headers=headers) as resp:
                    await resp.read()
                    self.statuses[resp.status] = self.statuses.get(resp.status, 0) + 1

        await asyncio.gather(*(worker() for _ in range(self.args.concurrency)))


async def _measure(args: argparse.Namespace, url: str, gateway_pid: int) -> dict[str, object]:
    load = Load(url, args)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        await _wait_ready(http, url)
        started = rss_bytes(gateway_pid)
        await load.run(http, args.warmup)
        warm = rss_bytes(gateway_pid)
        samples = [warm]
        t0 = time.monotonic()
        for _ in range(10):
            await load.run(http, args.requests // 10)
            samples.append(rss_bytes(gateway_pid))
        elapsed = time.monotonic() - t0
    measured = args.requests // 10 * 10
    retained = (samples[-1] - warm) / measured
    return {
        "cache_mb": args.cache_mb,
        "requests_after_warmup": measured,
        "warmup_requests": args.warmup,
        "statuses": dict(sorted(load.statuses.items())),
        "rss_start_mb": round(started / 2**20, 1),
        "rss_after_warmup_mb": round(warm / 2**20, 1),
        "rss_end_mb": round(samples[-1] / 2**20, 1),
        "rss_peak_mb": round(max(samples) / 2**20, 1),
        "rss_tenths_mb": [round(s / 2**20, 1) for s in samples],
        "retained_bytes_per_request": round(retained, 1),
        "requests_per_s": round(measured / elapsed, 1),
        "goal_bytes_per_request": GOAL_BYTES_PER_REQUEST,
        "goal_met": retained <= GOAL_BYTES_PER_REQUEST,
    }


def run(args: argparse.Namespace) -> int:
    session_bytes = int(args.cache_mb * 2**20)
    caps = ["--prompt-cache-mb", str(args.cache_mb), "--router-set", f"max_session_bytes={session_bytes}"]
    namespace = "soak" + uuid.uuid4().hex[:8]
    with NatsServer() as nats:
        worker_port, gateway_port = free_port(), free_port()
        worker = _spawn([
            "worker", "--engine", "mock", "--speedup", "1000", "--nats", nats.url, "--port", str(worker_port),
            "--namespace", namespace, "--worker-id", "w0", "--num-blocks", str(CONTEXT_BLOCKS),
        ])  # fmt: skip
        gateway = _spawn([
            "gateway", "--nats", nats.url, "--port", str(gateway_port), "--namespace", namespace, *caps,
        ])  # fmt: skip
        try:
            result = asyncio.run(_measure(args, f"http://127.0.0.1:{gateway_port}", gateway.pid))
        finally:
            stop_all((gateway, worker))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            print(f"{key:>28}: {value}")
    return 0
