"""Shared parts of the live routing checks: prompt text that shares exactly the prefixes a scenario means
it to share, and what the workers themselves say they hold (to wait until a gateway has heard it)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

from router.protocol import Subjects
from tests.gateway.gateways import worker_blocks

Holdings = dict[str, set[tuple[int, str]]]


def text(tag: str, chars: int) -> str:
    """`chars` characters of words that start with `tag`; texts of different tags share no prefix when
    their tags differ in the first character, and none of their words are common English."""
    rng = random.Random(tag)
    words = [tag]
    while sum(len(w) + 1 for w in words) < chars:
        words.append("".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(rng.randint(3, 9))))
    return " ".join(words)[:chars]


def chat(*turns: tuple[str, str]) -> list[dict[str, Any]]:
    return [{"role": role, "content": content} for role, content in turns]


class WorkerCaches:
    """The workers' own account of the blocks they hold (their state dumps over NATS)."""

    def __init__(self, nc: Any, subjects: Subjects, worker_ids: Sequence[str]) -> None:
        self.nc = nc
        self.subjects = subjects
        self.worker_ids = list(worker_ids)

    async def holdings(self) -> Holdings:
        dumps = await asyncio.gather(*(worker_blocks(self.nc, self.subjects, w) for w in self.worker_ids))
        return dict(zip(self.worker_ids, dumps, strict=True))
