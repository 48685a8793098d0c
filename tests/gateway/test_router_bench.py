"""`kvgate bench router --json` runs the real code end to end and prints its measurements (hashing,
routing, ingestion, index memory) under stable keys."""

from __future__ import annotations

import json
import subprocess
import sys

KEYS = {
    "hash_us_p50",
    "hash_incremental_us_p50",
    "route_us_p50",
    "route_us_p99",
    "ingest_events_per_s",
    "index_bytes_per_entry",
    "workers",
    "blocks",
}


def test_bench_router_json_prints_the_keys() -> None:
    cmd = [sys.executable, "-m", "gateway.cli", "bench", "router", "--json", "--workers", "4"]
    cmd += ["--blocks", "6000", "--prompt-tokens", "4096", "--iterations", "50"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(out.stdout)
    assert result.keys() >= KEYS
    assert result["workers"] == 4
    assert 5000 < result["blocks"] <= 6000
    assert result["ingest_events_per_s"] > 0 and result["route_us_p50"] > 0
    assert 20 < result["index_bytes_per_entry"] < 1000  # a real measurement, not a constant


def test_bench_router_refuses_sizes_it_cannot_build() -> None:
    cmd = [sys.executable, "-m", "gateway.cli", "bench", "router", "--prompt-tokens", "100"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "need" in out.stdout
