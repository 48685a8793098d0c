"""`kvgate bench live` at a tiny size: a fresh kvgate per policy and a system started by a command, the
same seeded workload against each, one table."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.live_bench import System, add_arguments, parse_systems, run_order
from gateway.natsd import free_port

TINY_LOADGEN = (
    "--workload chat --rate 0 --requests 6 --duration 30 --turns const:2 --user-len const:200"
    " --output-len const:3 --think-time const:0.05 --ignore-eos"
)


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_systems_from_policies_commands_and_urls_in_a_rotating_order() -> None:
    args = parse(
        "--policies", "session_kv,round_robin", "--command", "peer=serve {port}", "--url", "x=http://h:1"
    )
    systems = parse_systems(args)
    assert systems == [
        System("session_kv", "policy", "session_kv"),
        System("round_robin", "policy", "round_robin"),
        System("peer", "command", "serve {port}"),
        System("x", "url", "http://h:1"),
    ]
    assert [s.name for s in run_order(systems, 1)] == ["round_robin", "peer", "x", "session_kv"]
    assert [s.name for s in run_order(systems, 4)] == [s.name for s in systems]
    with pytest.raises(ValueError, match="NAME=VALUE"):
        parse_systems(parse("--url", "http://h:1"))
    with pytest.raises(ValueError, match="differ"):
        parse_systems(parse("--policies", "round_robin", "--url", "round_robin=http://h:1"))


@pytest.mark.slow
def test_a_policy_and_a_command_system_measured_with_the_same_workload(tmp_path: Path) -> None:
    worker = (
        f"{sys.executable} -m gateway.cli worker --engine mock --port {{port}} --num-blocks 256 --speedup 20"
    )
    argv = [sys.executable, "-m", "gateway.cli", "bench", "live", "--policies", "round_robin"]
    argv += [
        "--command",
        f"bare-worker={worker}",
        "--seeds",
        "3",
        "--workers",
        "1",
        "--port",
        str(free_port()),
    ]
    argv += ["--worker-args", "--num-blocks 256 --speedup 20", "--loadgen-args", TINY_LOADGEN]
    argv += ["--ready-timeout", "120", "--out", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    assert set(rows) == {"system", "round_robin", "bare-worker"}
    cells = {name: [c.strip() for c in row.split("|")[1:-1]] for name, row in rows.items()}
    # every turn served: the p50 / p90 over the turns sent are the plain ones, and exact
    for name in ("round_robin", "bare-worker"):
        plain = cells[name][2].split(" / ")[:2]
        assert cells[name][3].split(" / ") == plain
    assert cells["round_robin"][6] == "0" and cells["bare-worker"][6] == "0"  # errors
    assert cells["round_robin"][7] == "0" and cells["bare-worker"][7] == "0"  # unfinished: all were
    # kvgate's own gateway: its CPU per request, read from /proc in clock ticks (10 ms), so six quick
    # requests may round to 0 on an idle machine; a kvgate gateway gets a figure, nothing else does
    assert float(cells["round_robin"][8]) >= 0
    assert cells["bare-worker"][8] == "-"  # not a kvgate gateway: no figure
    results = json.loads((tmp_path / "results.json").read_text())
    assert [(r["system"], r["seed"], r["summary"]["requests"]) for r in results] == [
        ("round_robin", 3, 6),
        ("bare-worker", 3, 6),
    ]
    assert [r["gateway_cpu_ms_per_request"] is None for r in results] == [False, True]
    # the gateway's metrics at the run's end, with its requests counted; none from a bare worker
    metrics = (tmp_path / "round_robin-seed3" / "gateway_metrics.txt").read_text()
    assert re.search(r'^kvgate_requests_total\{[^}]*status="200"[^}]*\} 6\.0$', metrics, re.M), metrics
    assert not (tmp_path / "bare-worker-seed3" / "gateway_metrics.txt").exists()
    # the same seeded workload: the same prompts on both
    prompts = [r["summary"]["prompt_tokens"] for r in results]
    assert prompts[0] == prompts[1] > 0
