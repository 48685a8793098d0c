"""The conversations behind the Responses API's `previous_response_id`: per tenant, bounded, with a TTL.

Each stored response keeps the whole conversation up to and including its own output (as chat
messages, so a chained request replays it as the prompt without translating again) and the session it
was routed in (the chain is an explicit session). Entries live in this process (LRU, bounded in bytes)
and, when the bus is reachable, in a JetStream key-value bucket shared by every gateway replica, so a
chain continues on any of them; the bucket's `max_age` is the TTL. A key is `<tenant>.<response id>`,
the tenant a hash of the API key, so one tenant's id is not found under another's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any

import msgspec
import xxhash
from nats.aio.client import Client as NATS
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError

log = logging.getLogger("kvgate.gateway.responses")

BUS_TIMEOUT_S = 2.0


class StoredConversation(msgspec.Struct):
    session_id: str
    messages: list[dict[str, Any]]
    expires_at: float  # wall-clock seconds (shared across processes)


def tenant_of(api_key: str | None) -> str:
    """A key-safe token for the API key (never the key itself)."""
    return "anon" if not api_key else "t" + xxhash.xxh3_64_hexdigest(api_key.encode())


class ResponseStore:
    def __init__(
        self,
        bucket: str,
        *,
        ttl_s: float = 3600.0,
        max_bytes: int = 64 * 1024 * 1024,
        max_entry_bytes: int = 8 * 1024 * 1024,
        bus_max_bytes: int = 1024 * 1024 * 1024,
    ) -> None:
        self.bucket = bucket
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self.max_entry_bytes = max_entry_bytes
        self.bus_max_bytes = bus_max_bytes
        self.nc: NATS | None = None  # set when the gateway's bus connection is up
        self._local: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._kv: Any = None
        self._kv_lock = asyncio.Lock()

    @property
    def shared(self) -> bool:
        return self._kv is not None

    async def put(self, tenant: str, response_id: str, conversation: StoredConversation) -> bool:
        """False when the conversation is over the per-entry bound (it is not stored)."""
        data = msgspec.msgpack.encode(conversation)
        if len(data) > self.max_entry_bytes:
            log.warning("response store: %s not stored, %d bytes over the bound", response_id, len(data))
            return False
        key = f"{tenant}.{response_id}"
        self._remember(key, data)
        kv = await self._bucket()
        if kv is not None:
            try:
                await asyncio.wait_for(kv.put(key, data), BUS_TIMEOUT_S)
            except Exception as exc:  # the bus is down or the bucket full: this replica still has it
                log.warning("response store: %s kept on this replica only: %s", response_id, exc)
        return True

    async def get(self, tenant: str, response_id: str) -> StoredConversation | None:
        key = f"{tenant}.{response_id}"
        data = self._local.get(key)
        if data is not None:
            self._local.move_to_end(key)
        else:
            data = await self._fetch(key)
        if data is None:
            return None
        try:
            conversation = msgspec.msgpack.decode(data, type=StoredConversation)
        except msgspec.DecodeError:
            return None
        if conversation.expires_at <= time.time():
            self._forget(key)
            return None
        return conversation

    def new_expiry(self) -> float:
        return time.time() + self.ttl_s

    async def _fetch(self, key: str) -> bytes | None:
        kv = await self._bucket()
        if kv is None:
            return None
        try:
            entry = await asyncio.wait_for(kv.get(key), BUS_TIMEOUT_S)
        except (KeyNotFoundError, NotFoundError):
            return None
        except Exception as exc:
            log.warning("response store: unreachable: %s", exc)
            return None
        if entry.value is None:
            return None
        self._remember(key, entry.value)
        return entry.value

    async def _bucket(self) -> Any:
        if self._kv is not None or self.nc is None or not self.nc.is_connected:
            return self._kv
        async with self._kv_lock:
            if self._kv is None:
                js = self.nc.jetstream()
                try:
                    try:
                        self._kv = await asyncio.wait_for(js.key_value(self.bucket), BUS_TIMEOUT_S)
                    except BucketNotFoundError:
                        self._kv = await asyncio.wait_for(
                            js.create_key_value(
                                bucket=self.bucket,
                                ttl=self.ttl_s,
                                max_bytes=self.bus_max_bytes,
                                max_value_size=self.max_entry_bytes,
                            ),
                            BUS_TIMEOUT_S,
                        )
                except Exception as exc:
                    log.warning("response store: no bucket, responses kept per replica: %s", exc)
        return self._kv

    def _remember(self, key: str, data: bytes) -> None:
        self._forget(key)
        self._local[key] = data
        self._bytes += len(data)
        while self._bytes > self.max_bytes and self._local:
            _, old = self._local.popitem(last=False)
            self._bytes -= len(old)

    def _forget(self, key: str) -> None:
        old = self._local.pop(key, None)
        if old is not None:
            self._bytes -= len(old)
