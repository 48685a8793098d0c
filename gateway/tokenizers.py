"""The workers' tokenizers, fetched once per content hash from the JetStream object store.

A worker (or a bridge) stores its tokenizer files under their hash before it registers, and its
registration names that hash; each gateway replica fetches a hash the first time a registration
names it, checks size and hash, and builds the tokenizer in a thread (a large tokenizer.json takes
a moment to parse). `byte`, and a local path (a tokenizer.json this gateway can read), load directly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from nats.aio.client import Client as NATS

from router.chat import HFTokenizer, Tokenizer, load_tokenizer
from router.tokenizer_files import HASH_PREFIX, MAX_BUNDLE_BYTES, decode_bundle, is_digest

log = logging.getLogger("kvgate.tokenizers")


class TokenizerUnavailable(LookupError):
    """A registration names a tokenizer this gateway cannot get (yet)."""


class Tokenizers:
    def __init__(
        self,
        bucket: str,
        connection: Callable[[], NATS | None],
        max_bytes: int = MAX_BUNDLE_BYTES,
        max_tokenizers: int = 32,
    ) -> None:
        """`max_tokenizers`: distinct tokenizers held at most (each may be tens of MB parsed)."""
        self.bucket = bucket
        self.connection = connection
        self.max_bytes = max_bytes
        self.max_tokenizers = max_tokenizers
        self._loaded: dict[str, Tokenizer] = {}
        self._fetching: dict[str, asyncio.Task[Tokenizer]] = {}
        self.fetches = 0

    def get(self, spec: str) -> Tokenizer | None:
        return self._loaded.get(spec)

    def prefetch(self, spec: str) -> None:
        """Start getting `spec` in the background (a worker just registered it)."""
        if spec not in self._loaded and spec not in self._fetching:
            try:
                self._start(spec).add_done_callback(_log_failure)
            except TokenizerUnavailable as exc:
                log.warning("%s", exc)

    async def load(self, spec: str) -> Tokenizer:
        """The tokenizer named `spec`; TokenizerUnavailable when it cannot be had."""
        tokenizer = self._loaded.get(spec)
        if tokenizer is not None:
            return tokenizer
        task = self._fetching.get(spec) or self._start(spec)
        return await asyncio.shield(task)

    def _start(self, spec: str) -> asyncio.Task[Tokenizer]:
        if len(self._loaded) + len(self._fetching) >= self.max_tokenizers:
            raise TokenizerUnavailable(f"tokenizer {spec}: already {self.max_tokenizers} tokenizers held")
        task = asyncio.get_running_loop().create_task(self._get(spec), name=f"kvgate-tokenizer-{spec[:20]}")
        self._fetching[spec] = task
        task.add_done_callback(lambda _t: self._fetching.pop(spec, None))
        return task

    async def _get(self, spec: str) -> Tokenizer:
        if is_digest(spec):
            data = await self._fetch(spec)
            try:
                tokenizer: Tokenizer = await asyncio.to_thread(lambda: HFTokenizer(decode_bundle(data, spec)))
            except ValueError as exc:
                raise TokenizerUnavailable(f"tokenizer {spec}: {exc}") from exc
        else:
            try:
                tokenizer = await asyncio.to_thread(load_tokenizer, spec)
            except (OSError, ValueError) as exc:
                raise TokenizerUnavailable(f"tokenizer {spec!r} cannot be loaded here: {exc}") from exc
        self._loaded[spec] = tokenizer
        log.info("tokenizer %s ready (%d tokens)", spec, tokenizer.vocab_size)
        return tokenizer

    async def _fetch(self, spec: str) -> bytes:
        nc = self.connection()
        if nc is None or not nc.is_connected:
            raise TokenizerUnavailable(f"tokenizer {spec}: NATS is unreachable")
        name = spec.removeprefix(HASH_PREFIX)
        try:
            store = await nc.jetstream().object_store(self.bucket)
            info = await store.get_info(name)
            if info.size is not None and info.size > self.max_bytes:
                raise TokenizerUnavailable(f"tokenizer {spec}: {info.size} bytes, over {self.max_bytes}")
            result = await store.get(name)
        except TokenizerUnavailable:
            raise
        except Exception as exc:  # nats-py raises a family of errors: missing bucket, object, timeouts
            raise TokenizerUnavailable(f"tokenizer {spec}: not in the object store ({exc})") from exc
        self.fetches += 1
        return result.data or b""


def _log_failure(task: asyncio.Task[Tokenizer]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("%s", exc)
