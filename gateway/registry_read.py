"""The worker registry as the NATS server holds it now: every live key of the bucket and its value.

Not nats-py's `KeyValue.keys()`, nor the end-of-initial-values marker of `watchall()`: both count
on the consumer's pending count, and on a busy machine the marker overtakes the values (measured:
`keys()` on a bucket of 8 keys came back short in 1,004 of 2,000 calls with the CPUs saturated). A
gateway that trusted it replayed the KV stream with no worker registered and dropped every event.
The stream's own list of subjects has no such race.
"""

from __future__ import annotations

import asyncio
import time

from nats.js.client import JetStreamContext
from nats.js.errors import KeyNotFoundError

from router.protocol import ProtocolError, WorkerRegistration, decode, registration_problem


async def read_registry(js: JetStreamContext, bucket: str, limit: int) -> list[tuple[str, bytes]]:
    """(key, value) of at most `limit` live keys, in key order. A key deleted or purged is left out;
    raises `NotFoundError` when the bucket does not exist."""
    prefix = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=prefix + ">")
    keys = sorted(subject.removeprefix(prefix) for subject in info.state.subjects or {})[:limit]
    kv = await js.key_value(bucket)

    async def value_of(key: str) -> bytes | None:
        try:
            entry = await kv.get(key, validate_keys=False)  # the server named it: a valid subject
        except KeyNotFoundError:  # deleted or purged (a marker is its last message), or expired
            return None
        return entry.value or None

    values = await asyncio.gather(*(value_of(key) for key in keys))
    return [(key, value) for key, value in zip(keys, values, strict=True) if value is not None]


def live_registration(key: str, value: bytes, stale_after_s: float) -> WorkerRegistration | None:
    """The worker registered under `key`; None when its last heartbeat is older than `stale_after_s`
    (a leftover of a worker that died without deregistering). Raises `ProtocolError` when the entry
    is malformed or not a valid registration for its key."""
    registration = decode(value, WorkerRegistration)
    problem = registration_problem(registration, key)
    if problem is not None:
        raise ProtocolError(problem)
    if time.time() - registration.heartbeat_ts > stale_after_s:
        return None
    return registration
