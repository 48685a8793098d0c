"""`kvgate bench gateway` at a tiny size: real processes, and the gateway's CPU per request reported."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.polling import until
from tests.processes import alive, children_of


@pytest.mark.slow
def test_the_gateway_bench_reports_its_cpu_per_request() -> None:
    argv = [sys.executable, "-m", "gateway.cli", "bench", "gateway", "--json", "--requests", "10"]
    argv += ["--throughput-requests", "80", "--rounds", "2", "--concurrency", "4"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["gateway_rps"] > 0 and result["direct_rps"] > 0
    # 80 routed requests cost the gateway some CPU, and far less than a second each
    assert 0 < result["gateway_cpu_ms_per_request"] < 1000


@pytest.mark.slow
async def test_sigterm_stops_the_nats_server_worker_and_gateway_a_bench_started() -> None:
    # each runs in a session of its own: the bench's clean-up stops them, or the kernel's SIGTERM when
    # the bench dies before it knew of one (a signal while the last child was still being started)
    argv = [sys.executable, "-m", "gateway.cli", "bench", "gateway", "--requests", "10"]
    argv += ["--throughput-requests", "10000000", "--rounds", "1", "--concurrency", "2"]
    bench = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started: list[int] = []
    try:
        await until(
            lambda: len(children_of(bench.pid)) >= 3, 60.0, "the bench's NATS server, worker, gateway"
        )
        started = children_of(bench.pid)
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 143
        await until(lambda: not any(alive(pid) for pid in started), 30.0, "its children stopped")
    finally:
        if bench.poll() is None:
            bench.kill()
        for pid in started:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
