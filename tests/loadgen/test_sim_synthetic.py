"""The load generator's workloads as simulator rows (`kvgate sim --workload`), and the sim's router
settings (`--pin-baselines`, `--set`)."""

from __future__ import annotations

import json
from itertools import pairwise

import pytest

from gateway.cli import main
from loadgen.sim.simulation import SimConfig, Simulation
from loadgen.sim.synthetic import make_workload, mixed_rows, parse_mix, workload_rows
from loadgen.sim.workload import Workload


def test_agentic_turns_extend_their_predecessor_and_end_in_tool_calls() -> None:
    rows = workload_rows(make_workload("agentic", 4.0, 3, 40_000), 3.0, 16)
    sessions: dict[str, list] = {}
    for row in rows:
        sessions.setdefault(row.session_id, []).append(row)
    assert len(sessions) >= 5
    for turns in sessions.values():
        for before, after in pairwise(turns):
            assert after.hash_ids[: len(before.hash_ids)] == before.hash_ids  # prompt + reply + tool result
            assert before.stop == "tool_use" and after.delay_ms > 0
            assert after.input_length > before.input_length + before.output_length
        assert turns[-1].stop == "end_turn"
    firsts = [turns[0].hash_ids for turns in sessions.values()]
    assert any(a[:100] == b[:100] for a in firsts for b in firsts if a is not b)  # agents' system prompts


def test_prefix_requests_have_no_session_and_share_their_documents() -> None:
    rows = workload_rows(make_workload("prefix", 20.0, 1, None), 3.0, 16)
    assert len(rows) > 20 and all(row.session_id is None for row in rows)
    assert len({tuple(row.hash_ids[:100]) for row in rows}) <= 8  # 8 documents of 2,048 tokens


def test_a_mix_merges_each_workloads_own_rows_by_arrival() -> None:
    mix = parse_mix("prefix+chat", [20.0, 2.0])
    assert mix == [("prefix", 20.0), ("chat", 2.0)]
    rows = mixed_rows(mix, 5.0, 16, 3, None)
    alone = [workload_rows(make_workload(name, rate, 3, None), 5.0, 16, 3) for name, rate in mix]
    assert len(rows) == sum(map(len, alone))
    assert [r.timestamp for r in rows] == sorted(r.timestamp for r in rows)
    assert [r for r in rows if r.session_id is None] == alone[0]  # the one-shot requests, as alone
    assert [r for r in rows if r.session_id is not None] == alone[1]  # every session's turns in order
    assert parse_mix("chat", [1.5]) == [("chat", 1.5)]
    assert parse_mix("prefix+agentic", [4.0]) == [("prefix", 4.0), ("agentic", 4.0)]
    for spec, rates in (("prefix+chat", [1.0, 2.0, 3.0]), ("prefix+prefix", [1.0]), ("prefix+voice", [1.0])):
        with pytest.raises(ValueError):
            parse_mix(spec, rates)


def test_cli_simulates_a_mix_of_workloads(capsys) -> None:
    args = ["sim", "--workload", "prefix+chat", "--rate", "10,1", "--duration", "3", "--workers", "2"]
    assert main([*args, "--policy", "kv_overlap", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["trace"] == "workload:prefix+chat"
    alone = len(workload_rows(make_workload("prefix", 10.0, 0, None), 3.0, 64))
    assert data["policies"]["kv_overlap"]["requests"] > alone  # the chat turns beside the documents
    assert main(["sim", "--workload", "prefix+chat", "--rate", "1,2,3"]) == 2
    assert "2 workloads but 3 rates" in capsys.readouterr().err


def test_baselines_pin_only_in_the_ablation() -> None:
    rows = workload_rows(make_workload("agentic", 4.0, 3, 40_000), 3.0, 16)
    pins = {}
    for ablation in (False, True):
        config = SimConfig(workers=2, num_blocks=2048, block_size=16, pin_baselines=ablation)
        for policy in ("kv_overlap", "session_kv"):
            workload = Workload(rows, block_size=16, trace_block_size=16, max_think_s=2.0)
            pins[policy, ablation] = Simulation(workload, policy, config).run().pins
    assert pins["kv_overlap", False] == 0 and pins["kv_overlap", True] > 0
    assert pins["session_kv", False] == pins["session_kv", True] > 0


def test_without_session_ids_the_router_infers_each_session_from_its_prompts() -> None:
    # `--no-session-ids`, as a client that sends no session header: the router finds every later turn's
    # session by the chain its prompt extends, one inferred session per agent with all its turns
    rows = workload_rows(make_workload("agentic", 4.0, 3, 40_000), 3.0, 16)
    agents = {row.session_id for row in rows}
    assert len(agents) >= 5 and len(rows) > len(agents)
    sessions = {}
    for named in (True, False):
        config = SimConfig(workers=2, num_blocks=2048, block_size=16, session_ids=named)
        workload = Workload(rows, block_size=16, trace_block_size=16, max_think_s=2.0)
        sim = Simulation(workload, "session_kv", config)
        assert all(r.ok for r in sim.run().records)
        sessions[named] = {s.id: s.turns for s in sim.router.sessions.values()}
    assert set(sessions[True]) == agents
    assert all(sid.startswith("inferred-") for sid in sessions[False])
    assert sorted(sessions[False].values()) == sorted(sessions[True].values())  # the same turns each


def test_cli_simulates_a_workload_with_router_settings(capsys) -> None:
    args = ["sim", "--workload", "chat", "--rate", "2", "--duration", "4", "--workers", "2"]
    args += ["--policy", "kv_overlap", "--set", "kv_temperature=0.5", "--json", "-"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["trace"] == "workload:chat" and data["policies"]["kv_overlap"]["completed"] > 5
    with pytest.raises(SystemExit):
        main(["sim", "--workload", "chat", "--trace", "t.jsonl"])
    assert main(["sim", "--workload", "chat", "--set", "no_such_field=1"]) == 2


def test_cli_policy_seed_changes_the_draws_not_the_traffic(capsys) -> None:
    args = ["sim", "--workload", "prefix", "--rate", "20", "--duration", "2", "--workers", "4"]
    args += ["--policy", "random", "--json", "-", "--seed", "0"]

    def result(*extra: str) -> dict:
        assert main(args + list(extra)) == 0
        return json.loads(capsys.readouterr().out)["policies"]["random"]

    plain, same, other = result(), result("--policy-seed", "0"), result("--policy-seed", "1")
    assert plain == same
    assert other["requests"] == plain["requests"]  # the traffic of --seed 0
    assert other["ttft_mean_ms"] != plain["ttft_mean_ms"]  # other random picks
