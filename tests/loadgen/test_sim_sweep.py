"""`kvgate sim --host-multiples`: the host-tier sweep's table and chart, on the shipped sample trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli import main
from loadgen.sim.sweep import parse_multiples

SAMPLE = Path(__file__).resolve().parents[2] / "traces" / "cc_sessions_sample.jsonl"
# two workers whose devices hold the sample's largest prompt (9,500 blocks) but not its sessions
SMALL = ["--trace", str(SAMPLE), "--limit", "60", "--workers", "2", "--num-blocks", "10000", "--jobs", "1"]
POLICIES = ["--policy", "session_kv,kv_overlap"]


def test_sweep_writes_the_table_and_the_chart(tmp_path, capsys) -> None:
    table, chart = tmp_path / "sweep.json", tmp_path / "sweep.png"
    args = ["sim", *SMALL, *POLICIES, "--host-multiples", "0,2", "--json", str(table)]
    assert main([*args, "--sweep-chart", str(chart)]) == 0
    printed = capsys.readouterr().out
    assert "| host tier | session_kv | kv_overlap |" in printed and "| 2x |" in printed

    data = json.loads(table.read_bytes())
    assert set(data) == {"trace", "workers", "num_blocks", "oracle_hit_rate", "ideal_ttft_mean_ms", "points"}
    assert (data["trace"], data["workers"], data["num_blocks"]) == ("cc_sessions_sample.jsonl", 2, 10_000)
    none, two = data["points"]
    assert (none["host_multiple"], none["host_blocks"]) == (0, 0)
    assert (two["host_multiple"], two["host_blocks"]) == (2, 20_000)
    for point in (none, two):
        assert set(point["policies"]) == {"session_kv", "kv_overlap"}
        for result in point["policies"].values():
            assert result["completed"] == result["requests"] == 60
    # no tier: exactly the plain replay's object; with one, the hit rate split by tier
    assert main(["sim", *SMALL, *POLICIES, "--json", "-"]) == 0
    assert none["policies"] == json.loads(capsys.readouterr().out)["policies"]
    for r in two["policies"].values():
        assert r["device_hit_rate"] + r["host_hit_rate"] == pytest.approx(r["hit_rate"], abs=1e-4)
    # the sample's sessions outgrow two devices: a host tier serves some of their prefixes
    assert max(r["host_hit_rate"] for r in two["policies"].values()) > 0

    png = chart.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_bad_sweeps_are_one_error_line(tmp_path, capsys) -> None:
    assert main(["sim", *SMALL, "--host-multiples", "1,-2"]) == 2
    assert main(["sim", *SMALL, "--host-multiples", "1,x"]) == 2
    assert main(["sim", *SMALL, "--sweep-chart", str(tmp_path / "c.png")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 3 and all(line.startswith("kvgate sim: ") for line in errors)
    assert not (tmp_path / "c.png").exists()


def test_parse_multiples() -> None:
    assert parse_multiples("0, 1,2,4,8") == [0.0, 1.0, 2.0, 4.0, 8.0]
    assert parse_multiples("0.5") == [0.5]
    for bad in ("", "1,1", "-1", "two"):
        with pytest.raises(ValueError, match="--host-multiples"):
            parse_multiples(bad)
