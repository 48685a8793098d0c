"""Trace rows (the Mooncake format, extended with sessions) and their deterministic prompt content.

Each trace hash id stands for one block of `trace_block_size` tokens and every block before it. Replay
turns an id into the same tokens (or text) everywhere, seeded by the id, so a prefix shared in the
trace is a prefix shared in what is sent.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from itertools import chain
from pathlib import Path
from typing import Annotated

import msgspec

from router.hashing import BASE_SEED, block_hashes_of_bytes, tokens_to_bytes

TRACE_BLOCK_SIZE = 512


# a trace file is input: a length or delay out of range is a clear error at its line, not a crash later
_Positive = Annotated[int, msgspec.Meta(ge=1)]
_NonNegative = Annotated[int, msgspec.Meta(ge=0)]


class TraceRow(msgspec.Struct, frozen=True):
    timestamp: float  # ms from the start of the trace
    input_length: _Positive
    output_length: _NonNegative
    hash_ids: list[int]
    session_id: str | None = None
    turn: _NonNegative = 0
    delay_ms: Annotated[float, msgspec.Meta(ge=0.0)] = 0.0
    stop: str | None = None  # "tool_use" or "end_turn"


class TraceError(ValueError):
    pass


_decoder = msgspec.json.Decoder(TraceRow)


def iter_trace(path: str | Path, limit: int | None = None) -> Iterator[TraceRow]:
    with open(path, "rb") as handle:
        for line_no, line in enumerate(handle, 1):
            if limit is not None and line_no > limit:
                return
            if not line.strip():
                continue
            try:
                yield _decoder.decode(line)
            except msgspec.DecodeError as exc:
                raise TraceError(f"{path}:{line_no}: {exc}") from exc


def load_trace(path: str | Path, limit: int | None = None) -> list[TraceRow]:
    return list(iter_trace(path, limit))


def is_session_trace(rows: Sequence[TraceRow]) -> bool:
    return any(row.session_id is not None for row in rows)


class TraceContent:
    """Deterministic tokens and text for trace hash ids."""

    def __init__(
        self,
        trace_block_size: int = TRACE_BLOCK_SIZE,
        vocab_size: int = 32_000,
        seed: int = 0,
    ) -> None:
        self.trace_block_size = trace_block_size
        self.vocab_size = vocab_size
        self.seed = seed

    def tokens_for_id(self, hash_id: int) -> list[int]:
        rng = random.Random(hash_id * 1_000_003 + self.seed)
        return [rng.randrange(self.vocab_size) for _ in range(self.trace_block_size)]

    def token_bytes_for_id(self, hash_id: int) -> bytes:
        """`tokens_for_id` in the byte form block hashes are taken over."""
        return tokens_to_bytes(self.tokens_for_id(hash_id))

    def ids_needed(self, row: TraceRow) -> list[int]:
        """The row's hash ids that its `input_length` reaches: a row may list more (a trace file is
        input), and each id stands for `trace_block_size` tokens or characters made on demand."""
        return row.hash_ids[: -(-row.input_length // self.trace_block_size)]

    def prompt_tokens(self, row: TraceRow) -> list[int]:
        tokens: list[int] = []
        for hash_id in self.ids_needed(row):
            tokens.extend(self.tokens_for_id(hash_id))
        return tokens[: row.input_length]

    def text_for_id(self, hash_id: int) -> str:
        """About `trace_block_size` characters of word-like ASCII (one token per byte for the byte
        tokenizer; fewer for a BPE one, but shared ids still give shared prefixes)."""
        rng = random.Random(hash_id * 1_000_003 + self.seed)
        letters = "abcdefghijklmnopqrstuvwxyz"
        words: list[str] = []
        size = 0
        while size < self.trace_block_size:
            word = "".join(rng.choice(letters) for _ in range(rng.randint(2, 8)))
            words.append(word)
            size += len(word) + 1
        return " ".join(words)[: self.trace_block_size - 1] + "\n"

    def prompt_text(self, row: TraceRow) -> str:
        text = "".join(self.text_for_id(hash_id) for hash_id in self.ids_needed(row))
        return text[: row.input_length]


class TraceBlockHasher:
    """Block hashes (router.hashing, `block_size` tokens) of trace prompts, memoised per hash id.

    A trace id fixes its whole prefix, so the chained hashes of its tokens are computed once per id:
    replaying a 120k-token agent turn costs a dictionary lookup per trace block, not 120k tokens of
    hashing. The result equals `router.hashing.block_hashes(content.prompt_tokens(row))`.
    """

    def __init__(self, content: TraceContent, block_size: int = 64, seed: int = BASE_SEED) -> None:
        if content.trace_block_size % block_size:
            raise TraceError("the trace block size must be a multiple of the engine block size")
        self.content = content
        self.block_size = block_size
        self.seed = seed
        self._per_id: dict[int, list[int]] = {}

    def _hashes_of_id(self, hash_id: int, parent: int | None) -> list[int]:
        hashes = self._per_id.get(hash_id)
        if hashes is None:
            # a trace block is whole engine blocks: its hashes continue the previous trace block's
            data = self.content.token_bytes_for_id(hash_id)
            hashes = self._per_id[hash_id] = block_hashes_of_bytes(data, self.block_size, self.seed, parent)
        return hashes

    def block_hashes(self, row: TraceRow) -> list[int]:
        per_trace_block = self.content.trace_block_size // self.block_size
        full_blocks = row.input_length // self.block_size
        # the ids the slow path reads (at least one, whose memo it fills even for a short prompt)
        ids = row.hash_ids[: max(1, -(-full_blocks // per_trace_block))]
        try:
            # every id seen before (the common case on replay): one C loop instead of one per id
            out = list(chain.from_iterable(map(self._per_id.__getitem__, ids)))
        except KeyError:
            out = self._hash_ids(row.hash_ids, full_blocks)
        del out[full_blocks:]
        assert len(out) <= per_trace_block * len(row.hash_ids)
        return out

    def _hash_ids(self, hash_ids: list[int], full_blocks: int) -> list[int]:
        out: list[int] = []
        for hash_id in hash_ids:
            out.extend(self._hashes_of_id(hash_id, out[-1] if out else None))
            if len(out) >= full_blocks:
                break
        return out
