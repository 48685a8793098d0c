"""`kvgate bench replay` end to end: its own nats-server, real snapshot and replay, sane JSON."""

from __future__ import annotations

import json
import subprocess
import sys


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "bench", "replay", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_replay_bench_json() -> None:
    done = bench("--blocks", "20000", "--tail-batches", "20", "--churn", "1", "--probes", "100", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["agree"] is True
    assert result["blocks"] >= 20_000 and result["tail_batches"] == 20
    # 8 bytes a block plus a little per run and per worker
    assert 20_000 <= result["snapshot_blocks"] <= result["blocks"]
    size = 8 * result["snapshot_blocks"]
    assert size <= result["snapshot_bytes"] <= size + 64 * result["batches"]
    assert result["catchup_s"] > 0 and result["full_replay_s"] > 0
    assert abs(result["catchup_vs_full_replay"] - result["catchup_s"] / result["full_replay_s"]) < 0.05
    assert result["goal_met"] == (result["catchup_s"] <= result["goal_catchup_s"])


def test_replay_bench_refuses_bad_arguments() -> None:
    done = bench("--blocks", "0")
    assert done.returncode == 2 and "--blocks" in done.stdout
