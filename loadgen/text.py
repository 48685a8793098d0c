"""Cheap deterministic filler text: slices of one seeded corpus of word-like ASCII.

At hundreds of requests a second the generator cannot afford a random call per character; a slice of
a pre-generated corpus costs a copy. Uniqueness between sessions comes from the random offset and
from the ids the workloads put in front of each piece.
"""

from __future__ import annotations

import random

import numpy as np

CORPUS_CHARS = 1 << 20


class TextSource:
    def __init__(self, seed: int = 0, size: int = CORPUS_CHARS) -> None:
        gen = np.random.default_rng(seed)
        letters = gen.integers(ord("a"), ord("z") + 1, size=size, dtype=np.uint8)
        # a space after about one letter in six: words of 1..~15 letters, like natural text
        letters[gen.random(size) < 1 / 6] = ord(" ")
        text = letters.tobytes().decode("ascii")
        self._corpus = text + text  # a slice may wrap around
        self._size = size

    def text(self, chars: int, rng: random.Random) -> str:
        """`chars` characters (at most the corpus size) from a random place."""
        chars = max(0, min(chars, self._size))
        start = rng.randrange(self._size)
        return self._corpus[start : start + chars]
