"""`kvgate bench gateway-ab`: the gateway CPU per request of two source trees, measured side by side.

For changes of a few percent, which one `kvgate bench gateway` run cannot resolve on a shared machine
(its runs swing +-10 %). Each side is a folder holding a copy of kvgate (`git worktree add`, or `git
archive REV | tar -x -C DIR`), whose code its processes run (`PYTHONPATH`, started outside the current
folder so that no other copy is imported). Each side gets its own namespace, mock worker and gateway
on one nats-server: two gateways of one namespace would be each other's replicas. A client then sends
the `kvgate bench gateway` body (one user message, `max_tokens` 4) in short throughput rounds, the two
sides alternating A B B A, and counts each gateway's CPU during its own rounds only: the scheduler's
nanoseconds of all its threads (`/proc/PID/task/*/schedstat`), where `/proc/PID/stat`'s 10 ms ticks
would need rounds ten times longer. Both sides run with one string-hash seed.

The figure is B's CPU over A's; run it again with `--first b` (the side started second measured a few
percent cheaper in A/A runs) and take both. docs/EXPERIMENTS.md ("Gateway CPU, fifth and sixth pass")
has what it resolves: A/A runs within ~5 %.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp

from gateway.bench import BenchClient, wait_ready
from gateway.live_bench import cpu_seconds, stop_all
from gateway.natsd import NatsServer, free_port
from kvutil.child_process import spawn_tied

SIDES = ("a", "b")
Sides = dict[str, tuple[str, str, int]]  # side -> (worker URL, gateway URL, gateway pid)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--a", required=True, type=Path, help="folder of side A's kvgate copy (the baseline)")
    parser.add_argument("--b", required=True, type=Path, help="folder of side B's kvgate copy")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--stream", action="store_true", help="stream the responses (SSE)")
    parser.add_argument("--rounds", type=int, default=30, help="throughput rounds per side")
    parser.add_argument("--per-round", type=int, default=600, help="requests per round")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight in a round")
    parser.add_argument("--warmup", type=int, default=500, help="requests per side before the rounds")
    parser.add_argument("--first", choices=SIDES, default="a", help="the side whose processes start first")


def round_order(rounds: int) -> list[str]:
    """A B, B A, A B, ...: neither side always goes first, nor always right after the other."""
    return [side for i in range(rounds) for side in (SIDES if i % 2 == 0 else SIDES[::-1])]


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds of every thread of `pid` from the scheduler's nanosecond counts, else (no schedstat)
    `/proc/PID/stat`'s ticks; None where unreadable."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        return sum(int(Path(f"/proc/{pid}/task/{t}/schedstat").read_text().split()[0]) for t in tasks) / 1e9
    except (OSError, ValueError, IndexError):
        return cpu_seconds(pid)


def summary(per_round_ms: dict[str, list[float]]) -> dict[str, float]:
    """Means per side, and B over A: of the means, and the geometric mean and median of the rounds'
    ratios (each B round over the A round beside it)."""
    a, b = per_round_ms["a"], per_round_ms["b"]
    ratios = [y / x for x, y in zip(a, b, strict=True) if x > 0 and y > 0]
    mean_a, mean_b = statistics.fmean(a), statistics.fmean(b)
    geomean = math.exp(statistics.fmean(map(math.log, ratios))) if ratios else math.nan
    return {
        "a_cpu_ms_per_request": round(mean_a, 4),
        "b_cpu_ms_per_request": round(mean_b, 4),
        "b_over_a": round(mean_b / mean_a, 4) if mean_a > 0 else math.nan,
        "b_over_a_geomean_of_rounds": round(geomean, 4),
        "b_over_a_median_of_rounds": round(statistics.median(ratios), 4) if ratios else math.nan,
    }


def _check_copy(folder: Path) -> Path:
    folder = folder.resolve()
    if not (folder / "gateway" / "cli.py").is_file():
        raise SystemExit(f"kvgate bench gateway-ab: {folder} holds no copy of kvgate (gateway/cli.py)")
    return folder


def _spawn(argv: list[str], code: Path, cwd: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}  # no tracing on either side
    env["PYTHONPATH"] = str(code)
    env["PYTHONHASHSEED"] = "0"
    return spawn_tied(
        [sys.executable, "-m", "gateway.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=cwd,
    )


@contextlib.contextmanager
def _sides(args: argparse.Namespace) -> Iterator[Sides]:
    """Each side's worker and gateway, torn down on exit."""
    code = {"a": _check_copy(args.a), "b": _check_copy(args.b)}
    procs: list[subprocess.Popen[bytes]] = []
    with NatsServer() as nats, tempfile.TemporaryDirectory(prefix="kvgate-ab-") as cwd:
        try:
            sides: Sides = {}
            for side in (args.first, "b" if args.first == "a" else "a"):
                namespace = f"ab{side}{uuid.uuid4().hex[:8]}"
                worker_port, gateway_port = free_port(), free_port()
                procs.append(_spawn([
                    "worker", "--engine", "mock", "--speedup", "100000", "--nats", nats.url,
                    "--port", str(worker_port), "--namespace", namespace, "--worker-id", "bench-0",
                ], code[side], cwd))  # fmt: skip
                gateway = _spawn([
                    "gateway", "--nats", nats.url, "--port", str(gateway_port), "--namespace", namespace,
                    "--log-level", "WARNING",
                ], code[side], cwd)  # fmt: skip
                procs.append(gateway)
                urls = f"http://127.0.0.1:{worker_port}", f"http://127.0.0.1:{gateway_port}"
                sides[side] = (*urls, gateway.pid)
            yield sides
        finally:
            stop_all(procs)


async def _measure(args: argparse.Namespace, sides: Sides) -> dict[str, list[float]]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        clients = {}
        for side, (worker, gateway, _) in sides.items():
            model = await wait_ready(http, worker, gateway)
            clients[side] = BenchClient(http, model, args.stream, 4)
            await clients[side].throughput(gateway, args.warmup, args.concurrency)
        per_round: dict[str, list[float]] = {side: [] for side in SIDES}
        for side in round_order(args.rounds):
            _, gateway, pid = sides[side]
            before = process_cpu_s(pid) or 0.0
            await clients[side].throughput(gateway, args.per_round, args.concurrency)
            spent = (process_cpu_s(pid) or 0.0) - before
            per_round[side].append(spent * 1e3 / args.per_round)
    return per_round


def run(args: argparse.Namespace) -> int:
    for name in ("rounds", "per_round", "concurrency"):
        if getattr(args, name) < 1:
            print(f"kvgate bench gateway-ab: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    with _sides(args) as sides:
        per_round = asyncio.run(_measure(args, sides))
    result = {
        **summary(per_round),
        "a": str(args.a),
        "b": str(args.b),
        "first": args.first,
        "stream": args.stream,
        "rounds": args.rounds,
        "per_round": args.per_round,
        "a_rounds": [round(x, 4) for x in per_round["a"]],
        "b_rounds": [round(x, 4) for x in per_round["b"]],
    }
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"A {args.a}: {result['a_cpu_ms_per_request']:.4f} ms CPU per request")
    print(f"B {args.b}: {result['b_cpu_ms_per_request']:.4f} ms CPU per request")
    print(
        f"B/A {result['b_over_a']:.3f} (rounds: geometric mean {result['b_over_a_geomean_of_rounds']:.3f}, "
        f"median {result['b_over_a_median_of_rounds']:.3f}); started first: {args.first}"
    )
    return 0
