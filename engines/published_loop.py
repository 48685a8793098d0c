"""What the worker publisher (`engines.publisher.Publisher`) drives: an engine loop and its engine.

Two kinds stand behind it: `engines.loop.EngineLoop` over an `Engine` in this process, and the
bridge's `engines.bridge.remote.RemoteEngine` for a vLLM or SGLang engine in another. Typed as
protocols, so that mypy holds the publisher to what both provide.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, TypeVar

from engines.engine import EngineLoad
from router.protocol import CachedBlock, KvEvent

T = TypeVar("T")


class PublishedEngine(Protocol):
    @property
    def has_host_tier(self) -> bool:
        """Whether blocks can wait on the host (then a pin hint's prefetch applies)."""
        ...

    def load(self) -> EngineLoad: ...

    def cached_blocks(self) -> list[CachedBlock]: ...

    def pin(self, session_id: str, block_hashes: list[int], ttl_s: float, host_ttl_s: float = 0.0) -> int: ...


class PublishedLoop(Protocol):
    on_events: Callable[[list[KvEvent]], None] | None  # set by the publisher: the engine's KV events
    on_finished: Callable[[], None] | None  # set by the publisher: a request finished

    @property
    def engine(self) -> PublishedEngine: ...

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` between engine steps."""
        ...

    async def prefetch(self, block_hashes: list[int]) -> None:
        """Bring these blocks back from the host tier ahead of a turn."""
        ...
