"""`kvgate trace import`: kv-cache-tester sessions and Mooncake rows into kvgate rows, and the samples
the repository ships."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.cli import main
from loadgen.trace import TRACE_BLOCK_SIZE, is_session_trace, load_trace

ROOT = Path(__file__).resolve().parents[2]


def request(t: float, tokens: int, ids: list[int], **extra: object) -> dict[str, object]:
    return {"t": t, "type": "n", "in": tokens, "out": 50, "hash_ids": ids, "stop": "tool_use", **extra}


def session(sid: str, requests: list[dict[str, object]], **extra: object) -> dict[str, object]:
    top = {"models": ["m"], "block_size": 64, "hash_id_scope": "local", "tool_tokens": 1024}
    return {"id": sid, **top, "system_tokens": 1024, "requests": requests, **extra}


def run_import(tmp_path: Path, fmt: str, *inputs: Path, extra: tuple[str, ...] = ()) -> list[dict]:
    out = tmp_path / "out.jsonl"
    assert main(["trace", "import", fmt, *map(str, inputs), "-o", str(out), *extra]) == 0
    load_trace(out)  # what loadgen and sim read
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_kv_cache_tester_sessions_share_their_system_prompt_and_keep_the_rest_private(
    tmp_path: Path,
) -> None:
    # 2,048 tokens of tools + system prompt = 32 blocks of 64 = 4 kvgate blocks; then private text.
    # Both sessions number their blocks 1, 2, ... (local scope): equal numbers, different text.
    first = list(range(1, 49))  # 48 blocks: 3,072 tokens
    a = session("a", [request(0.0, 3072, first), request(10.0, 3100, [*first, 49], think_time=4.0)])
    b = session("b", [request(0.0, 3072, first)])
    (tmp_path / "in").mkdir()
    for s in (a, b):
        (tmp_path / "in" / f"{s['id']}.json").write_text(json.dumps(s))
    rows = run_import(tmp_path, "kv-cache-tester", tmp_path / "in", extra=("--session-gap-s", "0"))

    by_key = {(r["session_id"], r["turn"]): r for r in rows}
    a0, a1, b0 = by_key["a", 0], by_key["a", 1], by_key["b", 0]
    assert [len(r["hash_ids"]) for r in (a0, a1, b0)] == [6, 7, 6]  # ceil(tokens / 512)
    assert a0["hash_ids"][:4] == b0["hash_ids"][:4]  # the shared prompt
    assert a0["hash_ids"][4] != b0["hash_ids"][4]  # the same local numbers, not the same text
    assert a1["hash_ids"][:6] == a0["hash_ids"]  # the next turn extends the previous prompt
    assert a1["delay_ms"] == 4000.0 and a1["timestamp"] == 10_000
    assert a0["stop"] == "tool_use" and a0["turn"] == 0 and a0["delay_ms"] == 0


def test_kv_cache_tester_sub_agents_are_sessions_on_their_parents_clock(tmp_path: Path) -> None:
    child = [request(0.0, 1000, list(range(1, 17)), api_time=2.0), request(5.0, 1100, list(range(1, 18)))]
    spawn = {"t": 30.0, "type": "subagent", "models": ["small"], "tool_tokens": 512, "requests": child}
    parent = session("p", [request(0.0, 3072, list(range(1, 49)), stop=""), spawn])
    path = tmp_path / "p.json"
    path.write_text(json.dumps([parent]))  # a file may hold a list of sessions
    rows = run_import(tmp_path, "kv-cache-tester", path)

    assert [(r["session_id"], r["turn"], r["timestamp"]) for r in rows] == [
        ("p", 0, 0),
        ("p/sub1", 0, 30_000),
        ("p/sub1", 1, 35_000),
    ]
    assert rows[0]["stop"] is None  # "" in the source: no stop reason
    assert rows[2]["delay_ms"] == 3000.0  # no think_time: the gap less the previous turn's api_time


def test_kv_cache_tester_turns_are_cut_at_max_turns(tmp_path: Path) -> None:
    turns = [request(float(i), 640, list(range(1, 11))) for i in range(5)]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(session("s", turns)))
    rows = run_import(tmp_path, "kv-cache-tester", path, extra=("--max-turns", "3"))
    assert [r["turn"] for r in rows] == [0, 1, 2]


def test_mooncake_rows_come_back_unchanged_and_sorted(tmp_path: Path) -> None:
    source = ROOT / "traces" / "mooncake_conversation_sample.jsonl"
    lines = source.read_text().splitlines()
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("\n".join(lines[::-1]) + "\n")
    rows = run_import(tmp_path, "mooncake", shuffled)
    expected = [json.loads(line) for line in lines]
    assert sorted(rows, key=lambda r: json.dumps(r)) == sorted(expected, key=lambda r: json.dumps(r))
    assert [r["timestamp"] for r in rows] == sorted(r["timestamp"] for r in expected)


@pytest.mark.parametrize(
    ("fmt", "content", "says"),
    [
        ("mooncake", '{"timestamp": 0, "input_length": 1025, "output_length": 1, "hash_ids": [1]}', ":1: 1"),
        ("mooncake", "not json\n", ":1: not a Mooncake row"),
        ("kv-cache-tester", '{"requests": []}', "needs id, requests"),
        ("kv-cache-tester", '{"id": "x", "block_size": 100, "requests": []}', "does not divide"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], fmt: str, content: str, says: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert main(["trace", "import", fmt, str(path), "-o", str(tmp_path / "out.jsonl")]) == 1
    err = capsys.readouterr().err
    assert says in err and err.count("\n") == 1 and "Traceback" not in err


def test_the_shipped_samples_load_as_documented() -> None:
    cc = load_trace(ROOT / "traces" / "cc_sessions_sample.jsonl")
    mooncake = load_trace(ROOT / "traces" / "mooncake_conversation_sample.jsonl")
    assert len(cc) == 120 and len({r.session_id for r in cc}) == 23 and is_session_trace(cc)
    assert len(mooncake) == 300 and not is_session_trace(mooncake)
    for row in mooncake:
        assert len(row.hash_ids) == -(-row.input_length // TRACE_BLOCK_SIZE)
    for row in cc:  # kv-cache-tester lists whole 64-token blocks: a last 512-block under 64 has no id
        assert len(row.hash_ids) in {-(-row.input_length // TRACE_BLOCK_SIZE), row.input_length // 512}
    # samples, not the datasets (the README's import steps may put a full trace beside them)
    samples = ("cc_sessions_sample.jsonl", "mooncake_conversation_sample.jsonl")
    assert sum((ROOT / "traces" / name).stat().st_size for name in samples) < 400_000
