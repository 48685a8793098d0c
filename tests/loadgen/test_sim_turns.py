"""`kvgate sim --turns`: every replayed turn written as a JSON line, the records the summary is made of."""

from __future__ import annotations

import json

import msgspec
import pytest

from gateway.cli import main
from loadgen.sim.turns_out import TurnRow

# a pool too small for the sessions' contexts: session_kv holds turns at the router for memory
SIM = ["sim", "--workload", "agentic", "--rate", "0.3", "--duration", "30", "--workers", "2"]
SIM += ["--num-blocks", "2048", "--policy", "session_kv,round_robin", "--jobs", "1"]


def test_turns_are_the_records_the_summary_is_made_of(tmp_path, capsys) -> None:
    turns, report = tmp_path / "turns.jsonl", tmp_path / "report.json"
    assert main([*SIM, "--turns", str(turns), "--json", str(report)]) == 0
    assert f"turns to {turns}" in capsys.readouterr().out
    rows = [msgspec.json.decode(line, type=TurnRow) for line in turns.read_bytes().splitlines()]
    policies = json.loads(report.read_bytes())["policies"]
    for policy, figures in policies.items():
        mine = [r for r in rows if r.policy == policy]
        assert len(mine) == figures["requests"]
        assert [r.arrival_s for r in mine] == sorted(r.arrival_s for r in mine)
        done = [r for r in mine if r.ok]
        assert len(done) == figures["completed"]
        mean_ms = 1000.0 * sum(r.first_token_s - r.arrival_s for r in done) / len(done)
        assert mean_ms == pytest.approx(figures["ttft_mean_ms"], abs=0.001)
        cached = sum(r.cached_tokens for r in done) / sum(r.prompt_tokens for r in done)
        assert cached == pytest.approx(figures["hit_rate"], abs=0.001)
        for r in done:
            assert r.arrival_s <= r.sent_s < r.first_token_s <= r.finish_s
            assert r.worker in {"w0", "w1"} and 0 <= r.cached_tokens <= r.prompt_tokens
    held = [r for r in rows if r.sent_s > r.arrival_s]
    assert held and {r.policy for r in held} == {"session_kv"}  # the memory hold is session_kv's


def test_turns_take_one_replay_per_policy(tmp_path, capsys) -> None:
    args = [*SIM, "--turns", str(tmp_path / "t.jsonl"), "--host-multiples", "0,1"]
    assert main(args) == 2
    assert "--turns writes one replay per policy" in capsys.readouterr().err
    assert not (tmp_path / "t.jsonl").exists()
