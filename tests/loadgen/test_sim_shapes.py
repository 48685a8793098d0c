"""The rows loadgen/sim/shapes.py builds beyond `kvgate sim --workload` (no replay: the rows only)."""

from __future__ import annotations

from itertools import pairwise

from loadgen.sim.shapes import MAX_CONTEXT, TASK_BLOCKS, sub_agent_rows
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
