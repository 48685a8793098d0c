"""`kvgate bench gateway` at a tiny size: real processes, and the gateway's CPU per request reported."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


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
