"""Chat template and tokenizers shared by the gateway and the workers, so that both see the same tokens.

The template renders each message as its own segment, and segments are tokenized independently, so a
new turn costs tokenization of its new messages only (`SegmentCache`), and a prompt's tokens are a
pure function of its messages: the gateway's block hashes equal the worker's.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import xxhash

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_id: int
    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus the chat template's special tokens.

    Needs no download, so the default tiny model runs anywhere.
    """

    name = "byte"
    SPECIALS: tuple[str, ...] = (IM_START, IM_END, ENDOFTEXT)

    def __init__(self) -> None:
        self._special_ids = {text: 256 + i for i, text in enumerate(self.SPECIALS)}
        self._special_text = {i: text for text, i in self._special_ids.items()}
        self.vocab_size = 256 + len(self.SPECIALS)
        self.eos_token_id = self._special_ids[IM_END]

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for piece, special_id in _split_specials(text, self._special_ids):
            if special_id is None:
                out.extend(piece.encode("utf-8"))
            else:
                out.append(special_id)
        return out

    def decode(self, token_ids: Sequence[int]) -> str:
        parts: list[str] = []
        run = bytearray()
        for token in token_ids:
            if token < 256:
                run.append(token)
                continue
            parts.append(run.decode("utf-8", errors="replace"))
            run.clear()
            parts.append(self._special_text.get(token, ""))
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)


def _split_specials(text: str, specials: dict[str, int]) -> Iterable[tuple[str, int | None]]:
    """Split text into plain runs and special tokens, left to right."""
    start = 0
    while start < len(text):
        hits = [(text.find(s, start), s) for s in specials]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if not hits:
            yield text[start:], None
            return
        pos, special = min(hits)
        if pos > start:
            yield text[start:pos], None
        yield special, specials[special]
        start = pos + len(special)


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (the `tokenizers` package) with the same segment template."""

    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        self.name = path
        self._tok = _HFTokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        eos = self._tok.token_to_id(IM_END)
        if eos is None:
            eos = self._tok.token_to_id(ENDOFTEXT)
        self.eos_token_id = eos if eos is not None else self.vocab_size - 1

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=False)


def load_tokenizer(spec: str) -> Tokenizer:
    """`byte`, or a path to a `tokenizer.json`."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)


# --- template


class TemplateError(ValueError):
    """A message the template cannot render (the gateway answers 400)."""


def message_text(content: Any) -> str:
    """OpenAI content: a string, or a list of parts of which text parts are kept."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise TemplateError("only text content parts are supported")
            text = part.get("text")
            if not isinstance(text, str):
                raise TemplateError("a text content part needs a string 'text'")
            texts.append(text)
        return "".join(texts)
    raise TemplateError("message content must be a string or a list of parts")


def render_segments(messages: Sequence[dict[str, Any]], tools: Sequence[Any] | None = None) -> list[str]:
    """ChatML-style segments: tool definitions first (as a system segment), then one per message,
    then the assistant generation prompt."""
    segments: list[str] = []
    if tools:
        definitions = json.dumps(list(tools), sort_keys=True, separators=(",", ":"))
        segments.append(f"{IM_START}system\n# Tools\n{definitions}{IM_END}\n")
    for message in messages:
        if not isinstance(message, dict):
            raise TemplateError("each message must be an object")
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise TemplateError(f"unknown message role {role!r}")
        body = message_text(message.get("content"))
        if message.get("tool_calls"):
            body += "\n" + json.dumps(message["tool_calls"], sort_keys=True, separators=(",", ":"))
        if role == "tool" and message.get("tool_call_id"):
            body = f"[{message['tool_call_id']}] {body}"
        segments.append(f"{IM_START}{role}\n{body}{IM_END}\n")
    segments.append(f"{IM_START}assistant\n")
    return segments


class SegmentCache:
    """Tokens of recently seen segments, keyed by a hash of their text (bounded, LRU)."""

    def __init__(self, tokenizer: Tokenizer, capacity: int = 4096) -> None:
        self.tokenizer = tokenizer
        self.capacity = capacity
        self._tokens: OrderedDict[int, list[int]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def encode(self, segment: str) -> list[int]:
        key = xxhash.xxh3_64_intdigest(segment.encode("utf-8", errors="surrogatepass"))
        tokens = self._tokens.get(key)
        if tokens is not None:
            self._tokens.move_to_end(key)
            self.hits += 1
            return tokens
        self.misses += 1
        tokens = self.tokenizer.encode(segment)
        self._tokens[key] = tokens
        if len(self._tokens) > self.capacity:
            self._tokens.popitem(last=False)
        return tokens


def encode_chat(
    messages: Sequence[dict[str, Any]],
    tokenizer: Tokenizer,
    tools: Sequence[Any] | None = None,
    cache: SegmentCache | None = None,
) -> list[int]:
    """The prompt tokens of a chat request: the concatenated tokens of its segments."""
    encode = cache.encode if cache is not None else tokenizer.encode
    tokens: list[int] = []
    for segment in render_segments(messages, tools):
        tokens.extend(encode(segment))
    return tokens
