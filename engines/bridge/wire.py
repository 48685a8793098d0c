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
    token_ids: list[int]
    block_size: int
    medium: str | None
    lora_name: str | None
    group_idx: int | None


class EngineRemoved(msgspec.Struct, frozen=True):
    block_hashes: list[EngineHash]
    medium: str | None
    group_idx: int | None


class EngineCleared(msgspec.Struct, frozen=True):
    pass


EngineEvent = EngineStored | EngineRemoved | EngineCleared


class EngineBatch(msgspec.Struct, frozen=True):
    ts: float
    events: list[EngineEvent]
    dp_rank: int | None
    skipped: int = 0  # events of an unknown type or malformed, left out


# Field order of the positional (array_like) layout, after the tag, per vLLM's struct definitions.
_STORED_FIELDS = ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id", "medium",
                  "lora_name", "extra_keys", "group_idx")  # fmt: skip
_REMOVED_FIELDS = ("block_hashes", "medium", "group_idx")

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


def decode_batch(payload: bytes) -> EngineBatch:
    """One `EventBatch`: a map (`ts`, `events`, `data_parallel_rank`) or an array in that order;
    each event a map with a `type` key or an array whose first item is the type."""
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
            decoded.append(decode_event(raw_event))
        except WireError as exc:  # one bad or newer event must not cost the rest of the batch
            log.debug("skipping an engine event: %s", exc)
    return EngineBatch(float(ts), decoded, rank, len(events) - len(decoded))


def decode_event(raw: Any) -> EngineEvent:
    if isinstance(raw, dict):
        kind, fields = raw.get("type"), raw
    elif isinstance(raw, list) and raw:
        kind = raw[0]
        names = _STORED_FIELDS if kind == "BlockStored" else _REMOVED_FIELDS
        fields = dict(zip(names, raw[1:], strict=False))  # trailing fields of newer versions: ignored
    else:
        raise WireError("an event must be a map with a 'type' key or a non-empty array")
    if kind == "BlockStored":
        hashes, tokens = _hashes(fields.get("block_hashes")), _ints(fields.get("token_ids"), "token_ids")
        size = _int(fields.get("block_size"), "block_size")
        if len(tokens) != len(hashes) * size:
            raise WireError(f"{len(hashes)} blocks of {size} tokens, but {len(tokens)} token ids")
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
        )
    if kind == "BlockRemoved":
        return EngineRemoved(
            block_hashes=_hashes(fields.get("block_hashes")),
            medium=_opt_str(fields.get("medium")),
            group_idx=_opt_int(fields.get("group_idx")),
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


def medium_tier(medium: str | None) -> Tier:
    """vLLM's `medium`: GPU (or unset) is our device tier, CPU offload is host, anything else disk."""
    if medium is None or medium.upper() == "GPU":
        return "device"
    if medium.upper() == "CPU":
        return "host"
    return "disk"
