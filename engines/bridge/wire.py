"""The KV event wire format of vLLM and SGLang (ZMQ frames of msgpack `EventBatch`), decoded into one
normalised form: both the older positional events and the newer maps with a `type` key; unknown keys
are ignored, anything malformed is a `WireError`.
"""

from __future__ import annotations

import logging
from array import array
from typing import Any, Literal

import msgspec

from router.protocol import Tier

log = logging.getLogger(__name__)

EngineKind = Literal["vllm", "sglang"]
EngineHash = int | bytes

_U64 = (1 << 64) - 1


class WireError(ValueError):
    """Bytes from the engine that are not a KV event batch of either known layout."""


# --- the engine's wire format, decoded into one normalised form


class EngineStored(msgspec.Struct, frozen=True):
    block_hashes: list[EngineHash]
    parent: EngineHash | None
    token_ids: list[int]  # empty: a hash-only store (a copy of blocks the engine announced before)
    block_size: int
    medium: str | None
    lora_name: str | None
    group_idx: int | None
    remote: bool = False  # vLLM's `locality` "REMOTE": held by another node, not this worker


class EngineRemoved(msgspec.Struct, frozen=True):
    block_hashes: list[EngineHash]
    medium: str | None
    group_idx: int | None
    remote: bool = False


class EngineCleared(msgspec.Struct, frozen=True):
    pass


EngineEvent = EngineStored | EngineRemoved | EngineCleared


class EngineBatch(msgspec.Struct, frozen=True):
    ts: float
    events: list[EngineEvent]
    dp_rank: int | None
    skipped: int = 0  # events of an unknown type or malformed, left out


# Field order of the positional (array_like) layout, after the tag, per each engine's struct definitions:
# vLLM's vllm/distributed/kv_events.py (BlockStored, BlockRemoved), and SGLang's
# python/sglang/srt/disaggregation/kv_events.py, whose BlockStored ends at `medium` (a trailing item
# there is SGLang's cache-salt `metadata` or `component_type`, not vLLM's `lora_name`).
_STORED_FIELDS: dict[EngineKind, tuple[str, ...]] = {
    "vllm": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
             "lora_name", "extra_keys", "group_idx"),
    "sglang": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium"),
}  # fmt: skip
_REMOVED_FIELDS: dict[EngineKind, tuple[str, ...]] = {
    "vllm": ("block_hashes", "medium", "group_idx"),
    "sglang": ("block_hashes", "medium"),
}

_raw_decoder = msgspec.msgpack.Decoder()


def normalise_hash(value: Any) -> EngineHash:
    """Engine hashes are ints (unsigned, or signed int64 in older vLLM and SGLang) or raw bytes;
    the same 64 bits must give the same key whichever sign they were sent with."""
    if isinstance(value, bool):
        raise WireError(f"block hash must be an int or bytes, got {value!r}")
    if isinstance(value, int):
        return value & _U64
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    raise WireError(f"block hash must be an int or bytes, got {type(value).__name__}")


def decode_batch(payload: bytes, engine: EngineKind = "vllm") -> EngineBatch:
    """One `EventBatch`: a map (`ts`, `events`, `data_parallel_rank`) or an array in that order
    (SGLang's third item is `attn_dp_rank`); each event a map with a `type` key or an array whose
    first item is the type, its fields in `engine`'s order."""
    try:
        raw = _raw_decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise WireError(f"not msgpack: {exc}") from exc
    if isinstance(raw, dict):
        ts, events, rank = raw.get("ts"), raw.get("events"), raw.get("data_parallel_rank")
    elif isinstance(raw, list) and len(raw) >= 2:
        ts, events, rank = raw[0], raw[1], raw[2] if len(raw) > 2 else None
    else:
        raise WireError("an event batch must be a map or an array of at least 2 items")
    if not isinstance(ts, (int, float)) or isinstance(ts, bool) or not isinstance(events, list):
        raise WireError("an event batch needs a numeric ts and a list of events")
    rank = rank if isinstance(rank, int) and not isinstance(rank, bool) else None
    decoded: list[EngineEvent] = []
    for raw_event in events:
        try:
            decoded.append(decode_event(raw_event, engine))
        except WireError as exc:  # one bad or newer event must not cost the rest of the batch
            log.debug("skipping an engine event: %s", exc)
    return EngineBatch(float(ts), decoded, rank, len(events) - len(decoded))


def decode_event(raw: Any, engine: EngineKind = "vllm") -> EngineEvent:
    if isinstance(raw, dict):
        kind, fields = raw.get("type"), raw
    elif isinstance(raw, list) and raw:
        kind = raw[0]
        names = (_STORED_FIELDS if kind == "BlockStored" else _REMOVED_FIELDS)[engine]
        fields = dict(zip(names, raw[1:], strict=False))  # trailing fields of newer versions: ignored
    else:
        raise WireError("an event must be a map with a 'type' key or a non-empty array")
    remote = fields.get("locality") == "REMOTE"
    if kind == "BlockStored":
        hashes, tokens = _hashes(fields.get("block_hashes")), _ints(fields.get("token_ids"), "token_ids")
        if tokens:
            size = _int(fields.get("block_size"), "block_size")
            if len(tokens) != len(hashes) * size:
                raise WireError(f"{len(hashes)} blocks of {size} tokens, but {len(tokens)} token ids")
        else:  # vLLM's offloading connector announces its copies by hash alone (block_size 0 or its own)
            size = 0
        return EngineStored(
            block_hashes=hashes,
            parent=None
            if fields.get("parent_block_hash") is None
            else normalise_hash(fields["parent_block_hash"]),
            token_ids=tokens,
            block_size=size,
            medium=_opt_str(fields.get("medium")),
            lora_name=_opt_str(fields.get("lora_name")),
            group_idx=_opt_int(fields.get("group_idx")),
            remote=remote,
        )
    if kind == "BlockRemoved":
        return EngineRemoved(
            block_hashes=_hashes(fields.get("block_hashes")),
            medium=_opt_str(fields.get("medium")),
            group_idx=_opt_int(fields.get("group_idx")),
            remote=remote,
        )
    if kind == "AllBlocksCleared":
        return EngineCleared()
    raise WireError(f"unknown event type {kind!r}")


def _hashes(value: Any) -> list[EngineHash]:
    if not isinstance(value, list):
        raise WireError("block_hashes must be a list")
    return [normalise_hash(v) for v in value]


def _ints(value: Any, what: str) -> list[int]:
    try:
        if isinstance(value, list):
            array("I", value)  # checks every item is a uint32, at C speed
            return value
    except (TypeError, OverflowError):
        pass
    raise WireError(f"{what} must be a list of uint32")


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise WireError(f"{what} must be a positive int")
    return value


def _opt_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


# Each engine's `medium` names (matched case-insensitively) -> our tier. Sources: vLLM's
# vllm/distributed/kv_events.py (MEDIUM_GPU "GPU", MEDIUM_CPU "CPU", MEDIUM_STORAGE "STORAGE") and
# vllm/v1/kv_offload/mediums.py ("Disk"); SGLang's python/sglang/srt/disaggregation/kv_events.py
# StorageMedium (GPU "GPU", CPU "CPU_PINNED", DISK "DISK"), which HiCache's hiradix_cache.py puts on
# the events of its host copies; LMCache's events through vLLM's LMCache connector ("cpu").
MEDIUM_TIERS: dict[str, Tier] = {
    "GPU": "device",
    "CPU": "host",
    "CPU_PINNED": "host",
    "STORAGE": "disk",
    "DISK": "disk",
}


def medium_tier(medium: str | None) -> Tier | None:
    """The tier of an engine's `medium`. No medium (engines before tiers had only the GPU) is the
    device. A medium not in `MEDIUM_TIERS` (SGLang's EXTERNAL shared pool, LMCache's CXL, a name
    from a newer release) is None: not a tier of this worker that a policy could price, so the
    bridge leaves those events out rather than guess."""
    if medium is None:
        return "device"
    return MEDIUM_TIERS.get(medium.upper())
