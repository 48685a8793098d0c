"""The JetStream stream that carries the workers' KV events, as every side creates it.

A worker creates it when it first connects (`engines.publisher`); `kvgate bench replay` creates the
same one to measure a replica's recovery from it. Its bounds are what a gateway can replay: 15 minutes
of events, at most 512 MiB (older ones are dropped, and a gap is a state dump). Names are passed in,
so kvutil stays free of the project's other packages.
"""

from __future__ import annotations

from nats.js import api

MAX_AGE_S = 15 * 60.0
MAX_BYTES = 512 * 1024 * 1024


def kv_stream_config(name: str, subject: str) -> api.StreamConfig:
    """The KV event stream `name` over `subject` (a wildcard over every worker's KV subject)."""
    return api.StreamConfig(
        name=name,
        subjects=[subject],
        retention=api.RetentionPolicy.LIMITS,
        discard=api.DiscardPolicy.OLD,
        max_age=MAX_AGE_S,
        max_bytes=MAX_BYTES,
        storage=api.StorageType.FILE,
        duplicate_window=60.0,
    )
