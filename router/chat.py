"""Chat templates and tokenizers shared by the gateway and the workers, so that both see the same tokens.

A prompt is rendered as text segments that tokenize independently, and segments are tokenized once
(`SegmentCache`), so a new turn costs tokenization of its new text only and a prompt's tokens are a
pure function of its messages: the gateway's block hashes equal the worker's.

- The byte tokenizer, and a tokenizer.json without a chat template: kvgate's ChatML, one segment per
  message.
- A model with its own chat template (`HFTokenizer` over its tokenizer files): the whole prompt
  rendered as the engines render it (`router.template`), cut before each added token (`<|im_start|>`,
  `<|start_header_id|>`...). The `tokenizers` library splits the text on added tokens before
  anything else, so the pieces tokenize to exactly the whole text's tokens; a template that rewrites
  earlier turns (dropping old reasoning, say) just makes its changed pieces new ones.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import xxhash

from router.template import (
    DEFAULT_OPTIONS,
    ChatOptions,
    ChatTemplate,
    TemplateError,
    message_texts,
    select_template,
    special_tokens_of,
)
from router.tokenizer_files import TokenizerFiles, digest, read_folder

__all__ = ["ChatOptions", "TemplateError"]

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"


class Tokenizer(Protocol):
    vocab_size: int
    eos_token_id: int
    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: Sequence[int]) -> str: ...

    def chat_segments(self, messages: Any, tools: Any, options: ChatOptions) -> list[str]: ...


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
        # `_split_specials` in one C scan: the earliest special, the smallest of those starting there
        # (a regex tries its alternatives in order); ~2x faster on a chat segment, pinned by a test
        self._specials = re.compile("|".join(map(re.escape, sorted(self._special_ids))))

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        ids = self._special_ids
        start = 0
        for match in self._specials.finditer(text):
            if match.start() > start:
                out.extend(text[start : match.start()].encode("utf-8"))
            out.append(ids[match.group()])
            start = match.end()
        if start < len(text):
            out.extend(text[start:].encode("utf-8"))
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

    def chat_segments(self, messages: Any, tools: Any, options: ChatOptions = DEFAULT_OPTIONS) -> list[str]:
        return render_segments(messages, tools)


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
    """A Hugging Face tokenizer (tokenizer.json, via the `tokenizers` package), with the model's chat
    template and special tokens when its files carry them, else kvgate's ChatML segments."""

    def __init__(self, files: TokenizerFiles, name: str | None = None) -> None:
        from tokenizers import Tokenizer as _HFTokenizer

        self.files = files
        self.name = name or digest(files.encode())
        try:
            self._tok = _HFTokenizer.from_str(files.tokenizer_json.decode("utf-8"))
        except Exception as exc:  # the Rust library raises plain Exception on a bad file
            raise ValueError(f"invalid tokenizer.json: {exc}") from exc
        self._config = files.config()
        self.special_tokens = special_tokens_of(self._config)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = self._eos_id()
        self._templates: dict[str, ChatTemplate] = {}
        self._cuts = _cut_pattern(self._tok.get_added_tokens_decoder().values())
        self.has_template = self._template_source(False) is not None

    @classmethod
    def from_path(cls, path: str | Path) -> HFTokenizer:
        """A checkpoint folder, or its tokenizer.json (the files beside it are read too)."""
        files = read_folder(path)
        if files is None:
            raise ValueError(f"no tokenizer.json at {path}")
        return cls(files)

    def _eos_id(self) -> int:
        for text in (self.special_tokens.get("eos_token"), IM_END, ENDOFTEXT):
            token = self._tok.token_to_id(text) if text else None
            if token is not None:
                return token
        return self.vocab_size - 1

    def encode(self, text: str) -> list[int]:
        # add_special_tokens=False: chat templates write BOS themselves (transformers and vLLM agree)
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=False)

    def _template_source(self, with_tools: bool) -> str | None:
        return select_template(self._config, self.files.chat_template, with_tools)

    def chat_template(self, with_tools: bool) -> ChatTemplate | None:
        source = self._template_source(with_tools)
        if source is None:
            return None
        template = self._templates.get(source)
        if template is None:
            template = self._templates[source] = ChatTemplate(source, self.special_tokens)
        return template

    def render(self, messages: Any, tools: Any = None, options: ChatOptions = DEFAULT_OPTIONS) -> str:
        """The prompt text of a chat request (the model's template; ChatML without one)."""
        template = self.chat_template(bool(tools))
        if template is None:
            return "".join(render_segments(messages, tools))
        return template.render(messages, tools, options)

    def chat_segments(self, messages: Any, tools: Any, options: ChatOptions = DEFAULT_OPTIONS) -> list[str]:
        template = self.chat_template(bool(tools))
        if template is None:
            return render_segments(messages, tools)
        return self.split(template.render(messages, tools, options))

    def split(self, text: str) -> list[str]:
        """`text` cut before each added token that the tokenizer splits on first."""
        if self._cuts is None:
            return [text]
        pattern, cut = self._cuts
        starts = [m.start() for m in pattern.finditer(text) if m.start() > 0 and m.group() in cut]
        return [text[a:b] for a, b in zip([0, *starts], [*starts, len(text)], strict=True)]


def _cut_pattern(added: Iterable[Any]) -> tuple[re.Pattern[str], frozenset[str]] | None:
    """Every added token, longest first (the tokenizer matches leftmost-longest), and the ones a cut
    may precede: matched on the raw text, and not eating the whitespace before them."""
    tokens = {t.content: not t.lstrip and not t.normalized and not t.single_word for t in added}
    cut = frozenset(t for t, safe in tokens.items() if safe)
    if not cut:
        return None
    alternatives = "|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))
    return re.compile(alternatives), cut


def load_tokenizer(spec: str) -> Tokenizer:
    """`byte`, or a local path to a checkpoint folder or a `tokenizer.json`."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer.from_path(spec)


# --- template


def message_text(content: Any) -> str:
    """OpenAI content: a string, or a list of parts of which text parts are kept."""
    return "".join(message_texts(content))


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


SEGMENT_BYTES = 160  # an entry's key, its dict slot and the list header, estimated from above
BYTES_PER_TOKEN = 8 + 32  # a list slot and the int object (ids past 256 are not shared small ints)


class SegmentCache:
    """Tokens of recently seen segments, keyed by a hash of their text (bounded in count and in bytes,
    LRU)."""

    def __init__(self, tokenizer: Tokenizer, capacity: int = 4096, capacity_bytes: int = 64 << 20) -> None:
        self.tokenizer = tokenizer
        self.capacity = capacity
        self.capacity_bytes = capacity_bytes
        self.bytes = 0
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
        size = SEGMENT_BYTES + BYTES_PER_TOKEN * len(tokens)
        if size > self.capacity_bytes:
            return tokens  # larger than the whole cache: not kept
        self._tokens[key] = tokens
        self.bytes += size
        while len(self._tokens) > self.capacity or self.bytes > self.capacity_bytes:
            _, dropped = self._tokens.popitem(last=False)
            self.bytes -= SEGMENT_BYTES + BYTES_PER_TOKEN * len(dropped)
        return tokens


def encode_chat(
    messages: Sequence[dict[str, Any]],
    tokenizer: Tokenizer,
    tools: Sequence[Any] | None = None,
    cache: SegmentCache | None = None,
    options: ChatOptions = DEFAULT_OPTIONS,
) -> list[int]:
    """The prompt tokens of a chat request: the concatenated tokens of its segments.

    Raises TemplateError on a request the template cannot render."""
    encode = cache.encode if cache is not None else tokenizer.encode
    tokens: list[int] = []
    for segment in tokenizer.chat_segments(messages, tools, options):
        tokens.extend(encode(segment))
    return tokens
