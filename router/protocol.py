"""Everything that crosses the NATS bus: msgspec Structs (msgpack on the wire) and subject names.

One module, so that the workers, the gateway, the bridge and the simulator cannot disagree on a field.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Annotated, Literal, TypeVar

import msgspec

Tier = Literal["device", "host", "disk"]
TIERS: tuple[Tier, ...] = ("device", "host", "disk")

DEFAULT_NAMESPACE = "kvgate"


class ProtocolError(ValueError):
    """Bytes from the bus that are not a valid message of the expected type."""


# --- KV events


class BlockStored(msgspec.Struct, tag="stored", frozen=True):
    """Blocks became cached on a tier; `block_hashes` extend the chain that ends at `parent_hash`."""

    block_hashes: list[int]
    parent_hash: int | None = None
    tier: Tier = "device"


class BlockRemoved(msgspec.Struct, tag="removed", frozen=True):
    """Blocks left a tier (evicted, or moved to another tier, which then reports a store)."""

    block_hashes: list[int]
    tier: Tier = "device"


class AllBlocksCleared(msgspec.Struct, tag="cleared", frozen=True):
    """The worker dropped every cached block (reset, restart)."""


KvEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KvEventBatch(msgspec.Struct, frozen=True):
    """One publication on `kv.<worker>`: `seq` increases by one per batch, per worker process.

    `epoch` identifies the worker process (its start time in ns); a new epoch means the worker
    restarted and its previous blocks are gone.
    """

    worker_id: str
    epoch: int
    seq: int
    ts: float
    events: list[KvEvent]


class CachedBlock(msgspec.Struct, array_like=True, frozen=True):
    block_hash: int
    parent_hash: int | None
    tier: Tier = "device"


class KvStateDump(msgspec.Struct, frozen=True):
    """A worker's whole cached set, as of batch `seq`: the answer to a `StateDumpRequest`."""

    worker_id: str
    epoch: int
    seq: int
    blocks: list[CachedBlock]


class StateDumpRequest(msgspec.Struct, frozen=True):
    """Sent (NATS request) to `dump.<worker>` when the router saw a gap in that worker's sequence."""

    requester: str
    reason: str = "gap"


# --- load, registration, pins


MAX_BLOCK_MS = 1e6  # a block's copy time: finite, and beyond any link (a 1 GiB block at 1 MB/s)


class LoadReport(msgspec.Struct, frozen=True):
    """Published on `load.<worker>` several times a second."""

    worker_id: str
    ts: float
    running: int
    waiting: int
    active_prefill_tokens: int
    used_blocks: int
    total_blocks: int
    prefill_tok_s: float
    decode_tok_s: float
    host_blocks: int = 0  # the host tier's capacity in blocks (0: none, or a worker that predates tiers)
    # ms to copy one block from the host (disk) tier onto the device: its link's time, what a hit there
    # costs instead of the block's prefill; 0: unknown (no tier, an engine that does not say, older workers)
    host_block_ms: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_BLOCK_MS)] = 0.0
    disk_block_ms: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_BLOCK_MS)] = 0.0
    # such copies keep only their own request waiting (vLLM's offloading connector loads asynchronously);
    # False: the step that admits the request waits for them, with every request in it
    onboard_async: bool = False


class WorkerRegistration(msgspec.Struct, frozen=True):
    """A worker's entry in the registry KV bucket, rewritten on every heartbeat."""

    worker_id: str
    url: str
    model: str
    block_size: int
    num_blocks: int
    engine: str
    epoch: int
    heartbeat_ts: float
    tokenizer: str = "byte"
    max_num_seqs: int = 256
    publishes_events: bool = True
    # prompt + output tokens the worker serves; 0: unknown (e.g. a bridge's)
    max_model_len: Annotated[int, msgspec.Meta(ge=0)] = 0
    # the engine orders its queue by request priority and a waiting request preempts running ones it
    # outranks by more than this (SGLang's --enable-priority-scheduling); -1: it does not
    priority_threshold: Annotated[int, msgspec.Meta(ge=-1)] = -1
    # the worker answers vLLM's `return_token_ids` and continues an answer from kvgate's
    # `kvgate.output_token_ids`: a gateway can send a turn's decode apart from its prompt there
    returns_token_ids: bool = False
    # the blocks of the worker's host tier (0: none), as its load reports say (`LoadReport.host_blocks`)
    host_blocks: Annotated[int, msgspec.Meta(ge=0)] = 0
    # the most prompt tokens one engine step computes (0: unknown): Dynamo's router queue measures a
    # worker's prefill in flight against it (RouterConfig.kv_queue_threshold)
    max_num_batched_tokens: Annotated[int, msgspec.Meta(ge=0)] = 0


MAX_URL_CHARS = 2048
MAX_NAME_CHARS = 256  # model, engine
MAX_TOKENIZER_CHARS = 4096  # a path or a spec
MAX_BLOCK_SIZE = 1 << 16
MAX_NUM_BLOCKS = 1 << 40
MAX_NUM_SEQS = 1 << 20
MAX_PRIORITY = 1 << 30
_URL = re.compile(r"^https?://[^\s/?#@]+(/[^\s]*)?$")
_PRINTABLE = re.compile(r"^[\x21-\x7e][\x20-\x7e]*$")


def registration_problem(registration: WorkerRegistration, key: str | None = None) -> str | None:
    """What makes a registration from the bus unusable (None when it is fine): everything in it is
    untrusted, and the gateway divides by its block size, calls its URL and reads its tokenizer."""
    r = registration
    if not _TOKEN.match(r.worker_id):
        return f"worker id must match {_TOKEN.pattern}"
    if key is not None and key != r.worker_id:
        return f"entry {key!r} names another worker"  # a worker may write only its own entry
    if len(r.url) > MAX_URL_CHARS or not _URL.match(r.url):
        return "url must be an http:// or https:// URL without credentials"
    for name, value, limit in (
        ("model", r.model, MAX_NAME_CHARS),
        ("engine", r.engine, MAX_NAME_CHARS),
        ("tokenizer", r.tokenizer, MAX_TOKENIZER_CHARS),
    ):
        if len(value) > limit or not _PRINTABLE.match(value):
            return f"{name} must be 1 to {limit} printable characters"
    for field, number, low, high in (
        ("block_size", r.block_size, 1, MAX_BLOCK_SIZE),
        ("num_blocks", r.num_blocks, 0, MAX_NUM_BLOCKS),
        ("max_num_seqs", r.max_num_seqs, 1, MAX_NUM_SEQS),
        ("max_model_len", r.max_model_len, 0, MAX_NUM_BLOCKS),
        ("host_blocks", r.host_blocks, 0, MAX_NUM_BLOCKS),
        ("priority_threshold", r.priority_threshold, -1, MAX_PRIORITY),
        ("epoch", r.epoch, 0, (1 << 63) - 1),
    ):
        if not low <= number <= high:
            return f"{field} must be between {low} and {high}"
    if not math.isfinite(r.heartbeat_ts):
        return "heartbeat_ts must be a finite number"
    return None


# A router's session id: an explicit one up to `RouterConfig.max_session_id_len` (itself at most this),
# longer ones digested. Bounds what a worker keeps per pinned session, whatever a hint's sender says
MAX_SESSION_ID_CHARS = 1024
SessionId = Annotated[str, msgspec.Meta(max_length=MAX_SESSION_ID_CHARS)]


class PinHint(msgspec.Struct, frozen=True):
    """Keep a session's blocks on `pin.<worker>` until `ttl_s` has passed (an eviction hint only), and
    on its host tier, if it has one, until `host_ttl_s` (the weaker pin: dropped from host last).
    `prefetch_after_s` > 0: the session's next turn is expected then; a worker with a host tier brings
    the blocks it moved there back to the device at that time (if idle; else the turn onboards them)."""

    session_id: SessionId
    block_hashes: list[int]
    ttl_s: float
    host_ttl_s: float = 0.0
    prefetch_after_s: float = 0.0


# --- gateway replicas


class RoutePicked(msgspec.Struct, tag="picked", frozen=True):
    """A replica routed a request: the others record the same in-flight load and session binding."""

    replica: str
    request_id: str
    worker_id: str
    model: str
    num_tokens: int
    expected_output_tokens: int
    overlap_blocks: int
    session_id: str | None = None
    tool_call_pending: bool = False
    chain: bytes = b""  # the prompt's block hashes, packed little-endian uint64


class RouteFirstToken(msgspec.Struct, tag="first", frozen=True):
    replica: str
    request_id: str


class RouteDone(msgspec.Struct, tag="done", frozen=True):
    replica: str
    request_id: str
    finish_reason: str | None = None
    output_tokens: int = 0
    ok: bool = True


class ReplicaAlive(msgspec.Struct, tag="alive", frozen=True):
    """A replica's heartbeat: when it stops, the others drop that replica's in-flight predictions."""

    replica: str


ReplicaNote = RoutePicked | RouteFirstToken | RouteDone | ReplicaAlive


# --- encoding

_encoder = msgspec.msgpack.Encoder()

MessageT = TypeVar("MessageT", bound=msgspec.Struct)


def encode(message: msgspec.Struct) -> bytes:
    return _encoder.encode(message)


@functools.cache
def _decoder(message_type: type[MessageT]) -> msgspec.msgpack.Decoder[MessageT]:
    """One decoder per message type, built on first use (a few message types, each reused)."""
    return msgspec.msgpack.Decoder(message_type)


def decode(data: bytes, message_type: type[MessageT]) -> MessageT:
    """Decode bus bytes as `message_type`; anything malformed raises `ProtocolError`."""
    try:
        return _decoder(message_type).decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"invalid {message_type.__name__}: {exc}") from exc


_replica_note_decoder = msgspec.msgpack.Decoder(ReplicaNote)


def decode_replica_note(data: bytes) -> ReplicaNote:
    """Decode bus bytes as one of the `ReplicaNote` Structs (by their tag); anything malformed raises
    `ProtocolError`. (A union has no `__name__`, so `decode` cannot name it in its error.)"""
    try:
        return _replica_note_decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProtocolError(f"invalid replica note: {exc}") from exc


# --- subjects

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def check_token(value: str, what: str) -> str:
    """A NATS subject token: no dots, wildcards or spaces, so it cannot address other subjects."""
    if not _TOKEN.match(value):
        raise ProtocolError(f"{what} {value!r} must match {_TOKEN.pattern}")
    return value


class Subjects:
    """Subject and bucket names under one namespace."""

    def __init__(self, namespace: str = DEFAULT_NAMESPACE) -> None:
        self.namespace = check_token(namespace, "namespace")
        self.prefix = f"kvgate.{namespace}"

    def kv(self, worker_id: str) -> str:
        return f"{self.prefix}.kv.{check_token(worker_id, 'worker id')}"

    def load(self, worker_id: str) -> str:
        return f"{self.prefix}.load.{check_token(worker_id, 'worker id')}"

    def pin(self, worker_id: str) -> str:
        return f"{self.prefix}.pin.{check_token(worker_id, 'worker id')}"

    def dump(self, worker_id: str) -> str:
        return f"{self.prefix}.dump.{check_token(worker_id, 'worker id')}"

    @property
    def kv_all(self) -> str:
        return f"{self.prefix}.kv.>"

    @property
    def load_all(self) -> str:
        return f"{self.prefix}.load.>"

    @property
    def kv_stream(self) -> str:
        return f"KVGATE_{self.namespace.upper().replace('-', '_')}_KV"

    @property
    def replica_route(self) -> str:
        """Where gateway replicas share their picks and completions (`ReplicaNote`)."""
        return f"{self.prefix}.replica.route"

    @property
    def snapshot_bucket(self) -> str:
        """The object store bucket holding the latest index snapshot."""
        return f"kvgate_{self.namespace.replace('-', '_')}_snapshots"

    @property
    def tokenizer_bucket(self) -> str:
        """The object store bucket holding the workers' tokenizer files, named by content hash."""
        return f"kvgate_{self.namespace.replace('-', '_')}_tokenizers"

    @property
    def registry_bucket(self) -> str:
        return f"kvgate_{self.namespace.replace('-', '_')}_workers"

    @staticmethod
    def worker_of(subject: str) -> str:
        """The worker id at the end of a per-worker subject."""
        return subject.rsplit(".", 1)[-1]
