import random

import pytest

from router.chat import (
    IM_END,
    ByteTokenizer,
    SegmentCache,
    TemplateError,
    _split_specials,
    encode_chat,
    render_segments,
)


def test_byte_tokenizer_round_trip_with_specials() -> None:
    tok = ByteTokenizer()
    text = f"<|im_start|>user\nhé ✓{IM_END}\n"
    ids = tok.encode(text)
    assert ids[0] == 256 and tok.eos_token_id in ids
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_byte_tokenizer_encodes_as_the_plain_split() -> None:
    tok = ByteTokenizer()
    ids = {text: 256 + i for i, text in enumerate(tok.SPECIALS)}
    # specials, their fragments and overlaps, plain and multi-byte text, in random order
    pieces = [*tok.SPECIALS, "<|", "|>", "<|im_", "im_end|>", "<<|im_end|>", "a", "é", "\n", " ", "✓"]
    rng = random.Random(5)
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 12)))
        plain: list[int] = []
        for piece, special in _split_specials(text, ids):
            plain.extend(piece.encode("utf-8") if special is None else [special])
        assert tok.encode(text) == plain


def test_a_turn_extends_the_previous_prompt() -> None:
    tok = ByteTokenizer()
    turn1 = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]
    turn2 = [*turn1, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "more"}]
    a, b = encode_chat(turn1, tok), encode_chat(turn2, tok)
    generation_prompt = tok.encode(render_segments([])[-1])
    assert b[: len(a) - len(generation_prompt)] == a[: -len(generation_prompt)]


def test_segment_cache_tokenizes_only_new_messages() -> None:
    tok = ByteTokenizer()
    cache = SegmentCache(tok)
    msgs = [{"role": "user", "content": "x" * 100}]
    encode_chat(msgs, tok, cache=cache)
    misses = cache.misses
    encode_chat([*msgs, {"role": "assistant", "content": "y"}], tok, cache=cache)
    assert cache.misses == misses + 1  # only the new assistant message
    assert encode_chat(msgs, tok, cache=cache) == encode_chat(msgs, tok)


def test_tools_and_tool_calls_are_rendered() -> None:
    tools = [{"type": "function", "function": {"name": "ls"}}]
    segs = render_segments(
        [
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]},
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        ],
        tools,
    )
    assert '"name":"ls"' in segs[0] and '"id":"c1"' in segs[1] and "[c1] ok" in segs[2]


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "wizard", "content": "x"}],
        ["not a dict"],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "image_url"}]}],
    ],
)
def test_bad_messages(messages: list) -> None:
    with pytest.raises(TemplateError):
        render_segments(messages)
