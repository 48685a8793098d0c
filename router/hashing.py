"""Chained block hashes of a token sequence: the one contract the gateway and the engines share.

`h[0] = xxh3_64(le32(tokens[0:B]), seed)` and `h[i] = xxh3_64(le64(h[i-1]) ‖ le32(tokens[iB:(i+1)B]), seed)`.
Only full blocks are hashed. The seed folds in the LoRA adapter and the tenant's cache salt, so two
tenants (or adapters) never share a prefix. The base seed is Dynamo's (1337).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence

import xxhash

BASE_SEED = 1337
DEFAULT_BLOCK_SIZE = 16

_xxh3 = xxhash.xxh3_64_intdigest
_LITTLE_ENDIAN = sys.byteorder == "little"


def hash_seed(lora_name: str | None = None, cache_salt: str | None = None) -> int:
    """The seed for one (adapter, tenant salt) pair; the base seed when neither is set."""
    if not lora_name and not cache_salt:
        return BASE_SEED
    key = f"lora={lora_name or ''}\x00salt={cache_salt or ''}".encode()
    return _xxh3(key, BASE_SEED)


def tokens_to_bytes(tokens: Sequence[int]) -> bytes:
    """Tokens as little-endian uint32, the byte form every hash is taken over."""
    packed = array("I", tokens)
    if not _LITTLE_ENDIAN:
        packed.byteswap()
    return packed.tobytes()


def block_hashes(
    tokens: Sequence[int],
    block_size: int = DEFAULT_BLOCK_SIZE,
    seed: int = BASE_SEED,
    parent: int | None = None,
) -> list[int]:
    """Chained hashes of the full blocks of `tokens`, continuing from `parent` when given."""
    return block_hashes_of_bytes(tokens_to_bytes(tokens), block_size, seed, parent)


def block_hashes_of_bytes(
    data: bytes, block_size: int = DEFAULT_BLOCK_SIZE, seed: int = BASE_SEED, parent: int | None = None
) -> list[int]:
    """`block_hashes` of tokens given in their byte form (`tokens_to_bytes`)."""
    step = 4 * block_size
    full = len(data) - len(data) % step
    out: list[int] = []
    append = out.append
    start = 0
    if parent is None:
        if not full:
            return out
        parent = _xxh3(data[:step], seed)
        append(parent)
        start = step
    for offset in range(start, full, step):
        parent = _xxh3(parent.to_bytes(8, "little") + data[offset : offset + step], seed)
        append(parent)
    return out


class PrefixHasher:
    """Hashes a growing token sequence in time proportional to the tokens added.

    Holds the hashes of the full blocks seen so far and the tokens of the partial tail block,
    which is what an agent session needs: each turn extends the previous turn's tokens.
    """

    __slots__ = ("_hashes", "_tail", "block_size", "seed")

    def __init__(self, block_size: int = DEFAULT_BLOCK_SIZE, seed: int = BASE_SEED) -> None:
        self.block_size = block_size
        self.seed = seed
        self._hashes: list[int] = []
        self._tail: list[int] = []

    @property
    def hashes(self) -> list[int]:
        return self._hashes

    @property
    def num_tokens(self) -> int:
        return len(self._hashes) * self.block_size + len(self._tail)

    def extend(self, new_tokens: Sequence[int]) -> list[int]:
        """Append tokens; returns the hashes of the blocks this call completed."""
        tokens = self._tail + list(new_tokens) if self._tail else new_tokens
        full = len(tokens) - len(tokens) % self.block_size
        parent = self._hashes[-1] if self._hashes else None
        added = block_hashes(tokens[:full], self.block_size, self.seed, parent) if full else []
        self._hashes.extend(added)
        self._tail = list(tokens[full:])
        return added

    def truncate(self, num_tokens: int, tokens: Sequence[int]) -> None:
        """Keep the first `num_tokens` of `tokens` (the sequence this hasher has seen)."""
        keep_blocks = num_tokens // self.block_size
        del self._hashes[keep_blocks:]
        self._tail = list(tokens[keep_blocks * self.block_size : num_tokens])

    def copy(self) -> PrefixHasher:
        clone = PrefixHasher(self.block_size, self.seed)
        clone._hashes = list(self._hashes)
        clone._tail = list(self._tail)
        return clone
