"""The /v1/responses store in one process (no bus): per tenant, expiring, bounded in bytes."""

from __future__ import annotations

import time

from gateway.response_store import ResponseStore, StoredConversation, tenant_of


async def test_store_is_per_tenant_expires_and_is_bounded_in_bytes() -> None:
    store = ResponseStore(
        "unused", ttl_s=60, max_bytes=4096, max_entry_bytes=2048
    )  # no bus: this process only
    conversation = StoredConversation("s", [{"role": "user", "content": "x" * 100}], store.new_expiry())
    assert await store.put(tenant_of("key-a"), "resp_1", conversation)
    assert (await store.get(tenant_of("key-a"), "resp_1")) == conversation
    assert await store.get(tenant_of("key-b"), "resp_1") is None
    assert tenant_of("key-a") != tenant_of("key-b") and "key-a" not in tenant_of("key-a")
    expired = StoredConversation("s", [], time.time() - 1)
    await store.put("anon", "resp_old", expired)
    assert await store.get("anon", "resp_old") is None
    too_big = StoredConversation("s", [{"role": "user", "content": "x" * 4000}], store.new_expiry())
    assert not await store.put("anon", "resp_big", too_big)
    for i in range(100):  # far over 4 KiB in all: the oldest go first
        await store.put("anon", f"resp_{i}", conversation)
    assert store._bytes <= 4096
    assert await store.get("anon", "resp_99") is not None and await store.get("anon", "resp_0") is None
