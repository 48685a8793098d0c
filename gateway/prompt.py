"""A turn's prompt tokens and block hashes, computed the way the serving worker computes them.

Tokenizer and block size come from the worker's registration, so the gateway's hashes equal the
worker's. Work per turn follows the new tokens: segments are tokenized once (`SegmentCache`) and a
session's hashes continue from its previous turn's (`PrefixHasher`) wherever the tokens agree.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from gateway.validation import Turn
from router.chat import ChatOptions, SegmentCache, Tokenizer, encode_chat, load_tokenizer
from router.hashing import PrefixHasher, block_hashes, hash_seed

SESSION_BYTES = 512  # a session's key, entry, hasher and lists, estimated from above
BYTES_PER_ITEM = 8 + 32  # a list slot and its int (token ids past 256 and hashes are not shared)


class _SessionPrefix:
    __slots__ = ("hasher", "size", "tokens")

    def __init__(self, hasher: PrefixHasher) -> None:
        self.hasher = hasher
        self.tokens: list[int] = []
        self.size = SESSION_BYTES

    def measure(self) -> int:
        self.size = SESSION_BYTES + BYTES_PER_ITEM * (len(self.tokens) + len(self.hasher.hashes))
        return self.size


class PromptEncoder:
    """Tokenizers per spec, and the last prompt of each recent session (bounded in count and bytes, LRU).

    The byte bounds hold estimates from above of what the entries keep: `max_bytes` for the sessions'
    prompts, `segment_cache_bytes` per tokenizer for the segment cache."""

    def __init__(
        self,
        max_sessions: int = 10_000,
        segment_cache: int = 8192,
        resolve: Callable[[str], Tokenizer] = load_tokenizer,
        *,
        max_bytes: int = 64 << 20,
        segment_cache_bytes: int = 64 << 20,
    ) -> None:
        """`resolve`: the tokenizer a registration names (the gateway's fetched ones)."""
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes
        self.bytes = 0
        self.resolve = resolve
        self._segment_cache_size = segment_cache
        self._segment_cache_bytes = segment_cache_bytes
        self._caches: dict[str, SegmentCache] = {}
        self._sessions: OrderedDict[tuple[str, int, int], _SessionPrefix] = OrderedDict()

    def tokenizer(self, spec: str) -> Tokenizer:
        return self._cache(spec).tokenizer

    def _cache(self, spec: str) -> SegmentCache:
        cache = self._caches.get(spec)
        if cache is None:
            cache = SegmentCache(self.resolve(spec), self._segment_cache_size, self._segment_cache_bytes)
            self._caches[spec] = cache
        return cache

    def tokens(self, turn: Turn, tokenizer_spec: str) -> list[int]:
        """Raises router.chat.TemplateError on messages the template cannot render."""
        if turn.kind == "chat":
            cache = self._cache(tokenizer_spec)
            options = ChatOptions.from_body(turn.body)
            return encode_chat(turn.messages or [], cache.tokenizer, turn.tools, cache, options)
        if isinstance(turn.prompt, list):
            return turn.prompt
        return self._cache(tokenizer_spec).tokenizer.encode(turn.prompt or "")

    def hashes(
        self, tokens: list[int], block_size: int, cache_salt: str | None, session_id: str | None
    ) -> list[int]:
        seed = hash_seed(None, cache_salt)
        if session_id is None:
            return block_hashes(tokens, block_size, seed)
        key = (session_id, block_size, seed)
        state = self._sessions.pop(key, None)
        if state is None:
            state = _SessionPrefix(PrefixHasher(block_size, seed))
        else:
            self.bytes -= state.size
        common = _common_prefix(state.tokens, tokens)
        if common < state.hasher.num_tokens:
            state.hasher.truncate(common, state.tokens)
        state.hasher.extend(tokens[state.hasher.num_tokens :])
        state.tokens = tokens
        hashes = list(state.hasher.hashes)
        if state.measure() <= self.max_bytes:
            self._sessions[key] = state
            self.bytes += state.size
        while len(self._sessions) > self.max_sessions or self.bytes > self.max_bytes:
            self.bytes -= self._sessions.popitem(last=False)[1].size
        return hashes

    def forget(self, session_id: str | None, block_size: int, cache_salt: str | None) -> None:
        """Drop a session's prompt (its request was refused: nothing is kept for it)."""
        if session_id is not None:
            state = self._sessions.pop((session_id, block_size, hash_seed(None, cache_salt)), None)
            if state is not None:
                self.bytes -= state.size


def _common_prefix(old: list[int], new: list[int]) -> int:
    """Length of the common prefix; the usual agent turn extends the previous one (one C compare)."""
    if len(new) >= len(old) and new[: len(old)] == old:
        return len(old)
    limit = min(len(old), len(new))
    lo, hi = 0, limit  # binary search on prefix equality: O(n log n) compares done in C
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if old[:mid] == new[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo
