"""The engine as the worker publisher sees it, for an engine in another process."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from engines.bridge.translate import EventTranslator
from engines.engine import EngineLoad
from router.protocol import CachedBlock, KvEvent

T = TypeVar("T")


class RemoteEngine:
    """The engine as `engines.publisher.Publisher` sees it (its `loop` and `loop.engine`, the
    protocols of `engines.published_loop`), for an engine in another process: the blocks the bridge
    translated, and the load scraped from /metrics.

    vLLM and SGLang take no pin hints and have no host tier the bridge could fill ahead of a turn, so
    pins are acknowledged and ignored, and there is nothing to prefetch.
    """

    def __init__(self, translator: EventTranslator) -> None:
        self.translator = translator
        self.latest = EngineLoad(0, 0, 0, 0, 0, 0.0, 0.0)
        self.on_events: Callable[[list[KvEvent]], None] | None = None  # set by the Publisher
        self.on_finished: Callable[[], None] | None = None

    @property
    def engine(self) -> RemoteEngine:
        return self

    @property
    def has_host_tier(self) -> bool:
        return False

    async def call(self, fn: Callable[[], T]) -> T:
        return fn()

    async def prefetch(self, block_hashes: list[int]) -> None:
        return None

    def load(self) -> EngineLoad:
        return self.latest

    def cached_blocks(self) -> list[CachedBlock]:
        return self.translator.cached_blocks()

    def pin(self, session_id: str, block_hashes: list[int], ttl_s: float, host_ttl_s: float = 0.0) -> int:
        return 0
