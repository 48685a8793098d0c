from pathlib import Path

from loadgen.replay import TraceWorkload, think_delay_s
from loadgen.trace import TraceContent, TraceRow, load_trace

TRACES = Path(__file__).resolve().parents[2] / "traces"  # the samples the repository ships


def _content() -> TraceContent:
    return TraceContent(trace_block_size=64)


def test_open_loop_rows_arrive_at_their_timestamps_with_their_prompt() -> None:
    rows = [TraceRow(1000, 100, 5, [1, 2]), TraceRow(3000, 64, 7, [1]), TraceRow(2000, 150, 1, [3, 4, 5])]
    arrivals = list(TraceWorkload(rows, _content(), rate_scale=2.0).sessions())
    assert [offset for offset, _ in arrivals] == [0.0, 0.5, 1.0]  # (t - t0) / 1000 / rate_scale, sorted
    turns = [session.next_turn(None) for _, session in arrivals]
    assert [len(t.messages[0]["content"]) for t in turns] == [100, 150, 64]
    assert [t.max_tokens for t in turns] == [5, 1, 7] and not any(t.tool_result for t in turns)
    assert turns[0].messages[0]["content"][:64] == turns[2].messages[0]["content"]  # shared id 1
    assert all(session.next_turn("reply") is None for _, session in arrivals)


def test_session_rows_are_one_closed_loop_session_each() -> None:
    rows = [
        TraceRow(0, 64, 5, [1], "a", 0, 0, "tool_use"),
        TraceRow(50, 64, 5, [9], "b", 0, 0, "end_turn"),
        TraceRow(400, 128, 5, [1, 2], "a", 1, 3000, "end_turn"),
        TraceRow(900, 200, 5, [1, 2, 3, 4], "a", 2, 90_000, None),  # 90 s: capped
        TraceRow(20, 60, 5, [7]),  # a row without a session, open-loop
    ]
    arrivals = list(TraceWorkload(rows, _content(), max_think_s=10.0, rate_scale=1.0).sessions())
    assert [(round(o, 3), s.session_id) for o, s in arrivals] == [(0.0, "a"), (0.02, "r0000004"), (0.05, "b")]
    session = arrivals[0][1]
    turns = [session.next_turn(None), session.next_turn("x"), session.next_turn("y"), session.next_turn("z")]
    assert turns[3] is None
    assert [t.delay_s for t in turns[:3]] == [0.0, 3.0, 10.0]
    assert [t.tool_result for t in turns[:3]] == [False, True, False]  # after a tool_use turn only
    assert [len(t.messages[0]["content"]) for t in turns[:3]] == [64, 128, 200]
    # 200 > 4 ids * 64: padded to input_length, deterministically
    again = TraceWorkload(rows, _content(), max_think_s=10.0).sessions()
    first = next(again)[1]
    assert [first.next_turn(None) for _ in range(3)][2].messages == turns[2].messages
    assert think_delay_s(rows[2], 10.0, 2.0) == 1.5


def test_claude_code_trace_slice_yields_every_row_once() -> None:
    rows = load_trace(TRACES / "cc_sessions_sample.jsonl", limit=120)
    sent = 0
    for _, session in TraceWorkload(rows, TraceContent(), rate_scale=10.0).sessions():
        while session.next_turn("reply") is not None:
            sent += 1
    assert sent == 120
