from pathlib import Path

import pytest

from loadgen.replay import ReplayText
from loadgen.trace import TraceBlockHasher, TraceContent, TraceError, TraceRow, is_session_trace, load_trace
from router.hashing import block_hashes

TRACES = Path(__file__).resolve().parents[2] / "traces"  # the samples the repository ships


def test_memoised_block_hashes_equal_hashing_the_tokens() -> None:
    content = TraceContent(trace_block_size=64, vocab_size=1000)
    hasher = TraceBlockHasher(content, block_size=16)
    rows = [
        TraceRow(0, 64 * 3, 5, [1, 2, 3]),
        TraceRow(1, 64 * 2 + 40, 5, [1, 2, 9]),  # shares two blocks, partial last block
        TraceRow(2, 10, 5, [7]),
    ]
    for row in rows:
        assert hasher.block_hashes(row) == block_hashes(content.prompt_tokens(row), 16)
    assert hasher.block_hashes(rows[0])[:8] == hasher.block_hashes(rows[1])[:8]


def test_text_is_deterministic_and_shares_prefixes() -> None:
    content = TraceContent(trace_block_size=512)
    a = content.prompt_text(TraceRow(0, 1024, 1, [10, 11]))
    b = content.prompt_text(TraceRow(0, 1024, 1, [10, 12]))
    assert a[:512] == b[:512] and a != b and len(a) == 1024


def test_the_shipped_traces_load() -> None:
    rows = load_trace(TRACES / "cc_sessions_sample.jsonl", limit=50)
    assert len(rows) == 50 and is_session_trace(rows)
    assert all(r.hash_ids and r.input_length > 0 for r in rows)
    mooncake = load_trace(TRACES / "mooncake_conversation_sample.jsonl", limit=50)
    assert not is_session_trace(mooncake)


def test_memoised_rows_take_one_c_loop_with_the_same_result() -> None:
    content = TraceContent(trace_block_size=64, vocab_size=1000)
    warm = TraceBlockHasher(content, block_size=16)
    rows = [
        TraceRow(0, 64 * 4, 5, [1, 2, 3, 4]),
        TraceRow(1, 64 * 2 + 40, 5, [1, 2, 3, 4]),  # a prompt shorter than its ids: the tail is cut
        TraceRow(2, 10, 5, [1, 2]),  # shorter than one block
        TraceRow(3, 64 * 2, 5, [1, 2, 5]),  # a new id after known ones: the slow path
    ]
    for row in rows:
        cold = TraceBlockHasher(content, block_size=16)
        expected = block_hashes(content.prompt_tokens(row), 16)
        assert cold.block_hashes(row) == expected
        assert warm.block_hashes(row) == expected == warm.block_hashes(row)


def test_fast_trace_tokens_are_the_shake_words_mod_vocab() -> None:
    import hashlib
    from array import array

    from loadgen.sim.workload import FastTraceContent

    content = FastTraceContent(trace_block_size=512, vocab_size=32_000, seed=3)
    for hash_id in (0, 7, 2**40):
        words = array("I", hashlib.shake_128(f"3:{hash_id}".encode()).digest(4 * 512))
        tokens = content.tokens_for_id(hash_id)
        assert tokens == [w % 32_000 for w in words] and all(type(t) is int for t in tokens)


def test_fast_trace_bytes_are_its_tokens_bytes_and_hash_the_same() -> None:
    from loadgen.sim.workload import FastTraceContent
    from router.hashing import tokens_to_bytes

    content = FastTraceContent(trace_block_size=128, vocab_size=50_000, seed=1)
    for hash_id in (0, 5, 2**40):
        assert content.token_bytes_for_id(hash_id) == tokens_to_bytes(content.tokens_for_id(hash_id))
    hasher = TraceBlockHasher(content, block_size=16)
    row = TraceRow(0, 128 * 3 + 20, 5, [4, 8, 15, 16])
    assert hasher.block_hashes(row) == block_hashes(content.prompt_tokens(row), 16)


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ('"input_length":0,"output_length":1', "input_length"),
        ('"input_length":100,"output_length":-5', "output_length"),
        ('"input_length":100,"output_length":1,"turn":-1', "turn"),
        ('"input_length":100,"output_length":1,"delay_ms":-50', "delay_ms"),
    ],
)
def test_a_row_out_of_range_is_an_error_at_its_line(tmp_path: Path, row: str, field: str) -> None:
    # once the simulator crashed on such a row deep in its oracle (islice with a negative stop)
    trace = tmp_path / "bad.jsonl"
    good = '{"timestamp":0,"input_length":10,"output_length":1,"hash_ids":[1]}'
    trace.write_text(f'{good}\n{{"timestamp":1,{row},"hash_ids":[1]}}\n')
    with pytest.raises(TraceError, match=rf"bad\.jsonl:2: .* at `\$\.{field}`"):
        load_trace(trace)


def test_ids_past_the_prompts_length_are_not_made(monkeypatch: pytest.MonkeyPatch) -> None:
    # a trace row may list more ids than its length reaches: they must cost nothing (each is 512
    # tokens or characters made on demand; a line of a million ids was gigabytes)
    content = TraceContent(trace_block_size=64, vocab_size=1000)
    row = TraceRow(0, 100, 1, list(range(1000)))
    text, tokens = content.prompt_text(row), content.prompt_tokens(row)
    made: list[int] = []
    monkeypatch.setattr(content, "tokens_for_id", lambda i: made.append(i) or [1] * 64)
    monkeypatch.setattr(content, "text_for_id", lambda i: made.append(i) or "x" * 64)
    assert len(content.prompt_text(row)) == len(text) == 100
    assert len(content.prompt_tokens(row)) == len(tokens) == 100
    assert len(ReplayText(content).prompt(row)) == 100  # the live replay's memoised text
    assert made == [0, 1, 0, 1, 0, 1]
