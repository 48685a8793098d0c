"""The rows loadgen/sim/shapes.py builds beyond `kvgate sim --workload` (no replay: the rows only)."""

from __future__ import annotations

from itertools import pairwise

from loadgen.sim.shapes import (
    BASELINES,
    MAX_CONTEXT,
    TASK_BLOCKS,
    cli_rows,
    grid_row,
    mean_ttft_ms,
    replay,
    sub_agent_rows,
)
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
