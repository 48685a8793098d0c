"""`kvgate bench gateway-ab`: its round order and figures, and one tiny live run of this checkout
against itself (real nats-server, workers and gateways)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.ab_bench import round_order, summary

REPO = Path(__file__).resolve().parents[2]
BENCH = [sys.executable, "-m", "gateway.cli", "bench", "gateway-ab"]


def test_rounds_alternate_a_b_b_a() -> None:
    assert round_order(3) == ["a", "b", "b", "a", "a", "b"]
    assert round_order(4).count("a") == round_order(4).count("b") == 4


def test_summary_compares_b_with_a() -> None:
    result = summary({"a": [0.2, 0.4], "b": [0.1, 0.4]})
    assert result["a_cpu_ms_per_request"] == pytest.approx(0.3)
    assert result["b_cpu_ms_per_request"] == pytest.approx(0.25)
    assert result["b_over_a"] == pytest.approx(0.25 / 0.3, abs=1e-4)
    assert result["b_over_a_geomean_of_rounds"] == pytest.approx(math.sqrt(0.5 * 1.0), abs=1e-4)
    assert result["b_over_a_median_of_rounds"] == pytest.approx(0.75)


def test_a_folder_without_kvgate_is_refused(tmp_path: Path) -> None:
    argv = [*BENCH, "--a", str(tmp_path), "--b", str(REPO)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0 and "holds no copy of kvgate" in done.stderr


@pytest.mark.slow
def test_a_tiny_run_of_this_checkout_against_itself() -> None:
    argv = [*BENCH, "--a", str(REPO), "--b", str(REPO), "--json", "--first", "b"]
    argv += ["--rounds", "2", "--per-round", "20", "--warmup", "10", "--concurrency", "4"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["a_rounds"]) == len(result["b_rounds"]) == 2
    # 20 routed requests a round cost each gateway some CPU, and far less than a second each
    assert all(0 < ms < 1000 for ms in result["a_rounds"] + result["b_rounds"])
    assert result["b_over_a"] > 0 and result["first"] == "b"
