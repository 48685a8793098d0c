"""The rows loadgen/sim/shapes.py builds beyond `kvgate sim --workload` (no replay: the rows only)."""

from __future__ import annotations

from itertools import pairwise

import pytest

from loadgen.sim import shapes
from loadgen.sim.metrics import RequestRecord
from loadgen.sim.shapes import (
    BASELINES,
    MAX_CONTEXT,
    TASK_BLOCKS,
    Pool,
    agentic_shape,
    cli_rows,
    grid_row,
    live_rows,
    live_window,
    mean_ttft_ms,
    replay,
    sub_agent_rows,
)
from loadgen.sim.simulation import SimRun
from loadgen.sim.workload import parent_of


def test_a_sub_agent_starts_from_half_its_parents_prompt_and_grows_to_the_context_bound() -> None:
    rows = sub_agent_rows(0.1, fork=1, half=True)
    turns: dict[str, list] = {}
    for row in rows:
        turns.setdefault(row.session_id or "", []).append(row)
    children = [sid for sid in turns if parent_of(sid) is not None]
    assert children and all(sid.endswith("/sub1") for sid in children)
    for sid in children:
        parent, child = turns[parent_of(sid) or ""], turns[sid]
        forked = parent[1].hash_ids
        first = child[0].hash_ids
        assert first[: len(forked) // 2] == forked[: len(forked) // 2]  # the parent's prefix, half of it
        assert len(first) == len(forked) // 2 + TASK_BLOCKS  # then a task of its own
        assert child[0].timestamp > parent[0].timestamp
        for before, after in pairwise(child):  # each turn extends the one before
            assert after.hash_ids[: len(before.hash_ids)] == before.hash_ids
        assert all(row.input_length <= MAX_CONTEXT + 16 for row in child)
        assert child[-1].stop == "end_turn"


def test_a_grid_row_is_session_kv_against_the_better_baseline_on_the_same_draw() -> None:
    # a few seconds of agentic traffic; the policies' draws of seed 1, on both sides
    rows = cli_rows("agentic", 0.2, 12, MAX_CONTEXT)
    ours, best = grid_row(rows, {}, 1)
    assert ours == mean_ttft_ms(replay(rows, "session_kv", {}, 1))
    assert best == min(mean_ttft_ms(replay(rows, p, {}, 1)) for p in BASELINES)
    assert grid_row(rows, {}, 1) == (ours, best)  # deterministic per draw


def test_the_live_window_counts_turns_without_a_first_token_as_the_slowest_in_its_every_turn_p90() -> None:
    """Ten turns arrive before 90 s: eight with first tokens 1-8 s after arrival, one whose first token
    came after 120 s and one that never got one; one more arrives after the window. The p90 over the
    eight is numpy's; over all ten, the late two are the slowest, so the ninth-slowest-of-ten is one
    of them: infinite. With one late turn in twenty, the every-turn p90 is a measured turn again."""
    run = SimRun("session_kv")
    for i in range(11):
        record = RequestRecord(f"s{i}", 0, 9.0 * i if i < 10 else 95.0, 100, "w0")
        record.ok = True
        record.first_token = record.arrival + (i + 1 if i < 8 else 200.0)
        run.records.append(record)
    run.records[9].ok = False
    p50, p90, mean, late, p90_every = live_window(run)
    assert (p50, mean, late) == (4.5e3, 4.5e3, 2)
    assert p90 == pytest.approx(7.3e3)
    assert p90_every == float("inf")
    for i in range(10):  # ten more measured turns, 9-18 s: one late turn of twenty
        record = RequestRecord(f"t{i}", 0, 1.0, 100, "w0")
        record.ok, record.first_token = True, 1.0 + 9 + i
        run.records.append(record)
    run.records[8].first_token = run.records[8].arrival + 2.5
    _, _, _, late, p90_every = live_window(run)
    assert late == 1
    assert p90_every == 17e3  # the 18th of 20 sorted: 1-8, 2.5, 9-17 ... the two slowest 18 s and late


def test_the_live_rows_scale_with_the_arrival_rate() -> None:
    """Twice the rate: about twice the sessions in the same 90 s (the same seed)."""
    sessions = [len({row.session_id for row in live_rows(1, rate)}) for rate in (1.0, 2.0)]
    assert 1.6 * sessions[0] <= sessions[1] <= 2.4 * sessions[0]


def test_agentic_fields_shape_the_live_rows_as_loadgens_flags_do() -> None:
    """`--agentic agent_types=16`: sixteen system prompts where the default has four (block 100 of a
    session's first prompt is inside its agent's system prompt, past the template's common opening); a
    distribution reads as loadgen's flags write it."""

    def agents(rows: list) -> int:
        return len({row.hash_ids[100] for row in rows if row.turn == 0})

    assert agents(live_rows(1)) == 4
    assert agents(live_rows(1, shape=agentic_shape(["agent_types=16"]))) == 16
    shape = agentic_shape(["tool_result_tokens=const:2000", "agent_types=2"])
    assert shape["agent_types"] == 2
    growth = [
        b.input_length - a.input_length
        for a, b in pairwise(live_rows(1, shape=shape))
        if b.turn == a.turn + 1
    ]
    assert growth and min(growth) >= 2000
    with pytest.raises(SystemExit, match="no AgenticConfig field 'agents'"):
        agentic_shape(["agents=16"])


def test_baseline_settings_reach_the_baselines_and_session_kv_keeps_its_own(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`live --set` is session_kv's, `--baseline-set` every other policy's (Dynamo at its best); the
    pool, think cap and `--no-session-header` given reach every policy's replay."""
    seen: dict[str, dict[str, object]] = {}

    pools: list[tuple[Pool | None, bool]] = []

    def fake_replay(
        rows: object,
        policy: str,
        settings: dict[str, object],
        seed: int = 0,
        pool: Pool | None = None,
        session_ids: bool = True,
    ) -> SimRun:
        seen[policy] = settings
        pools.append((pool, session_ids))
        run = SimRun(policy)
        record = RequestRecord("s", 0, 0.0, 16, "w0")
        record.first_token, record.ok = 0.1, True
        run.records = [record]
        return run

    monkeypatch.setattr(shapes, "replay", fake_replay)
    monkeypatch.setattr(shapes, "live_rows", lambda seed, rate, shape: [])
    argv = ["shapes", "live", "--seeds", "1", "--policy", "session_kv,kv_overlap", "--set", "stall_factor=2"]
    argv += ["--baseline-set", "kv_affinity_ttl_s=60", "--baseline-set", "kv_queue=true"]
    argv += ["--workers", "8", "--num-blocks", "3072", "--max-think-s", "3", "--no-session-header"]
    monkeypatch.setattr("sys.argv", argv)
    shapes.main()
    expected = {"session_kv": {"stall_factor": 2}, "kv_overlap": {"kv_affinity_ttl_s": 60, "kv_queue": True}}
    assert seen == expected
    assert pools == [(Pool(8, 3072, 3.0), False)] * 2  # every policy on the pool asked for, no ids
    assert "seed 1 kv_overlap" in capsys.readouterr().out


def test_a_replay_runs_on_the_pool_it_is_given() -> None:
    """Two workers of 8,192 blocks: every turn of the live rows goes to one of those two, and each
    turn fits (none is refused for a context the pool cannot hold)."""
    rows = [row for row in live_rows(1, 0.2) if row.timestamp < 30_000]
    run = replay(rows, "session_kv", {}, 1, Pool(workers=2, num_blocks=8192))
    assert len(run.records) == len(rows) and all(r.ok for r in run.records)
    assert {r.worker for r in run.records} <= {"w0", "w1"}
