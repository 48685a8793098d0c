from __future__ import annotations

import random

from gateway.prompt import PromptEncoder
from gateway.validation import parse_turn
from router.chat import ByteTokenizer, encode_chat
from router.hashing import block_hashes, hash_seed


def test_session_hashes_equal_a_full_rehash_as_turns_grow_and_diverge() -> None:
    encoder = PromptEncoder(max_sessions=2)
    rng = random.Random(0)
    tokens: list[int] = []
    for turn in range(30):
        if turn % 7 == 6:  # the agent rewrote its history: the prefix diverges
            tokens = tokens[: rng.randrange(len(tokens) + 1)]
        tokens = tokens + [rng.randrange(300) for _ in range(rng.randrange(1, 60))]
        for session in ("a", "b", "c"):  # more sessions than the bound: evicted ones start over
            assert encoder.hashes(tokens, 16, None, session) == block_hashes(tokens, 16)
    salted = encoder.hashes(tokens, 16, "tenant", "a")
    assert salted == block_hashes(tokens, 16, hash_seed(None, "tenant")) != block_hashes(tokens, 16)


def test_chat_tokens_are_what_a_worker_encodes() -> None:
    body = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"tools":[{"function":{"name":"f"}}]}'
    turn = parse_turn(body, "chat")
    expected = encode_chat(turn.messages or [], ByteTokenizer(), turn.tools)
    encoder = PromptEncoder()
    assert encoder.tokens(turn, "byte") == expected
    assert encoder.tokens(turn, "byte") == expected  # second time from the segment cache
    completion = parse_turn(b'{"model":"m","prompt":"abc"}', "completion")
    assert encoder.tokens(completion, "byte") == [97, 98, 99]


def test_session_prompts_stay_under_the_byte_cap_and_a_refused_one_is_forgotten() -> None:
    encoder = PromptEncoder(max_bytes=200_000)
    for i in range(100):
        encoder.hashes([i] * 1000, 16, None, f"s{i}")  # ~80 KB each as estimated
        assert encoder.bytes <= 200_000
    assert 1 <= len(encoder._sessions) < 100 and ("s0", 16, hash_seed(None, None)) not in encoder._sessions
    encoder.forget("s99", 16, None)
    assert ("s99", 16, hash_seed(None, None)) not in encoder._sessions
