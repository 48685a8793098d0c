"""Bridge from a vLLM or SGLang engine's ZMQ KV events to the kvgate bus.

vLLM and SGLang publish their KV cache events on a ZMQ PUB socket: 3 frames (topic, 8-byte big-endian
sequence number, msgpack `EventBatch`). Their block hashes cannot be recomputed outside the engine, so
the bridge re-hashes every stored block from its `token_ids` with `router.hashing` (the hash the
gateway computes from prompts) and keeps a map engine hash -> our hash, to translate removals. It
publishes the result as `KvEventBatch` on JetStream, registers the engine as a worker with a heartbeat,
answers state-dump requests from its map, and optionally turns the engine's Prometheus /metrics into
load reports.

A sequence gap is filled from the engine's replay endpoint (DEALER `[b"", start_seq]`, replies until
seq -1) when one is given, else the worker's blocks are cleared; a sequence that goes back means the
engine restarted, which clears them too.
"""

from engines.bridge.engine_metrics import EngineMetrics, parse_metrics
from engines.bridge.loop import Bridge, BridgeConfig, tokenizer_bundle
from engines.bridge.remote import RemoteEngine
from engines.bridge.translate import EventTranslator
from engines.bridge.wire import EngineBatch, WireError, decode_batch, decode_event

__all__ = [
    "Bridge",
    "BridgeConfig",
    "EngineBatch",
    "EngineMetrics",
    "EventTranslator",
    "RemoteEngine",
    "WireError",
    "decode_batch",
    "decode_event",
    "parse_metrics",
    "tokenizer_bundle",
]
