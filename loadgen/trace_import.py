"""Public trace formats converted into kvgate trace rows (`loadgen.trace.TraceRow`, 512-token blocks).

- `mooncake`: Mooncake's JSONL (`kvcache-ai/Mooncake`, FAST25-release/traces): one request per line,
  `timestamp` (ms), `input_length`, `output_length`, `hash_ids` of 512-token blocks. Already kvgate's
  format without sessions: rows are checked and written back sorted by time.
- `kv-cache-tester`: the agentic coding sessions of `callanjfox/kv-cache-tester` (traces/*.json): one
  JSON object per session, `{"id", "block_size", "hash_id_scope", "tool_tokens", "system_tokens",
  "requests": [{"t", "in", "out", "hash_ids", "stop", "api_time", "think_time", "requests"?}]}`, `t` in
  seconds from the session's start, `hash_ids` per `block_size`-token block (64). A request with nested
  `requests` spawned a sub-agent: it becomes its own session (`<id>/sub<k>`) starting at its parent's
  time, as kvgate's own traces have them.

Block ids are regrouped into 512-token ids that keep kvgate's rule: an id stands for its block and every
block before it, so two prompts share a leading id exactly when they share that whole prefix. With
`hash_id_scope: "local"` (ids numbered per session) only the system prompt and tool definitions are
shared, between sessions with the same model and prompt sizes; with `"global"` every equal id is.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec

from loadgen.trace import TRACE_BLOCK_SIZE, TraceError, TraceRow

FORMATS = ("kv-cache-tester", "mooncake")

_row_decoder = msgspec.json.Decoder(TraceRow)
_encoder = msgspec.json.Encoder()


def import_mooncake(paths: Iterable[Path]) -> list[TraceRow]:
    """Mooncake JSONL rows, checked (a prompt has one id per started 512-token block), sorted by time."""
    rows: list[TraceRow] = []
    for path in paths:
        with open(path, "rb") as handle:
            for line_no, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = _row_decoder.decode(line)
                except msgspec.DecodeError as exc:
                    raise TraceError(f"{path}:{line_no}: not a Mooncake row: {exc}") from exc
                if len(row.hash_ids) != -(-row.input_length // TRACE_BLOCK_SIZE):
                    raise TraceError(
                        f"{path}:{line_no}: {len(row.hash_ids)} hash ids for {row.input_length} tokens;"
                        f" Mooncake rows have one per {TRACE_BLOCK_SIZE}-token block"
                    )
                rows.append(row)
    rows.sort(key=lambda row: row.timestamp)
    return rows


class _BlockIds:
    """Interns chained 512-token blocks: (id of the prefix before, the source keys of this block)."""

    def __init__(self) -> None:
        self._ids: dict[tuple[int, tuple[Any, ...]], int] = {}

    def chain(self, keys: list[Any], per_block: int) -> list[int]:
        out: list[int] = []
        parent = -1
        for start in range(0, len(keys), per_block):
            block = (parent, tuple(keys[start : start + per_block]))
            parent = self._ids.setdefault(block, len(self._ids))
            out.append(parent)
        return out


class KvCacheTesterImport:
    """kv-cache-tester sessions -> kvgate rows. Sessions start `session_gap_s` apart on average
    (Poisson, seeded): the source gives each session's own clock only. `max_turns` cuts each session
    (and sub-agent) after that many turns."""

    def __init__(self, session_gap_s: float = 15.0, seed: int = 0, max_turns: int = 0) -> None:
        if session_gap_s < 0 or max_turns < 0:
            raise TraceError("session_gap_s and max_turns cannot be negative")
        self.session_gap_s = session_gap_s
        self.max_turns = max_turns  # 0: every turn
        self.rng = random.Random(seed)
        self.ids = _BlockIds()
        self.skipped = 0  # requests without input or block ids

    def convert(self, sessions: Iterable[dict[str, Any]]) -> list[TraceRow]:
        rows: list[TraceRow] = []
        start_s = 0.0
        for session in sessions:
            rows.extend(self._session_rows(session, start_s))
            start_s += self.rng.expovariate(1.0 / self.session_gap_s) if self.session_gap_s else 0.0
        rows.sort(key=lambda row: (row.timestamp, row.session_id or "", row.turn))
        return rows

    def _session_rows(self, session: dict[str, Any], start_s: float) -> Iterator[TraceRow]:
        sid, requests, block_size = _session_fields(session)
        is_global = session.get("hash_id_scope", "local") == "global"
        subagents = 0
        pending = [(sid, requests, start_s, _prompt_of(session))]
        while pending:
            name, items, base_s, prompt = pending.pop(0)
            turn = 0
            previous: dict[str, Any] | None = None
            for item in items:
                if turn == self.max_turns > 0:
                    break
                at_s = base_s + float(item.get("t", 0.0))
                if item.get("requests"):
                    subagents += 1  # a sub-agent: its own session, prompt and clock
                    pending.append((f"{sid}/sub{subagents}", item["requests"], at_s, _prompt_of(item)))
                if int(item.get("in") or 0) <= 0 or not item.get("hash_ids"):
                    self.skipped += not item.get("requests")  # a sub-agent's spawn is no request
                    continue
                keys = _block_keys(item, block_size, prompt, None if is_global else sid, (name, turn))
                stop = item.get("stop") or None
                yield TraceRow(
                    timestamp=round(at_s * 1000.0, 3),
                    input_length=int(item["in"]),
                    output_length=max(1, int(item.get("out") or 0)),
                    hash_ids=self.ids.chain(keys, TRACE_BLOCK_SIZE // block_size),
                    session_id=name,
                    turn=turn,
                    delay_ms=_delay_ms(previous, item) if previous is not None else 0.0,
                    stop=stop if stop in ("tool_use", "end_turn") else None,
                )
                previous = item
                turn += 1


def _session_fields(session: dict[str, Any]) -> tuple[str, list[Any], int]:
    """A kv-cache-tester session's id, requests and block size; TraceError when it has none."""
    try:
        sid = str(session["id"])
        requests = session["requests"]
        block_size = int(session.get("block_size", 64))
    except (KeyError, TypeError, ValueError) as exc:
        raise TraceError(f"not a kv-cache-tester session (needs id, requests): {exc}") from exc
    if block_size <= 0 or TRACE_BLOCK_SIZE % block_size:
        raise TraceError(f"session {sid}: block_size {block_size} does not divide {TRACE_BLOCK_SIZE}")
    return sid, requests, block_size


def _block_keys(
    item: dict[str, Any],
    block_size: int,
    prompt: tuple[str, int, int],
    local_to: str | None,
    request: tuple[str, int],
) -> list[Any]:
    """One key per started block of a request's prompt: the source's hash ids (global, or local to
    session `local_to` past the shared system prompt and tools), then keys of the request's own
    (`request`: its session and turn) for a partial last block the source left out."""
    shared_blocks = prompt[2] // block_size  # whole blocks of system prompt + tools
    keys: list[Any] = [
        hash_id if local_to is None else (prompt, i) if i < shared_blocks else (local_to, hash_id)
        for i, hash_id in enumerate(item["hash_ids"])
    ]
    blocks = -(-int(item["in"]) // block_size)
    keys[blocks:] = []
    keys += [(*request, "tail", i) for i in range(len(keys), blocks)]
    return keys


def _prompt_of(entry: dict[str, Any]) -> tuple[str, int, int]:
    """What makes two sessions' leading blocks the same text (with session-local ids): the model and
    the sizes of the system prompt and tool definitions. (model, tool tokens, their sum)"""
    tools = int(entry.get("tool_tokens") or 0)
    system = int(entry.get("system_tokens") or 0)
    return (str((entry.get("models") or [""])[0]), tools, tools + system)


def _delay_ms(previous: dict[str, Any], item: dict[str, Any]) -> float:
    """The client's think/tool time between the previous turn's end and this one: `think_time` when
    the trace has it, else the gap between starts less the previous turn's `api_time`."""
    think = item.get("think_time")
    if think is not None:
        return max(0.0, float(think) * 1000.0)
    gap_s = float(item.get("t", 0.0)) - float(previous.get("t", 0.0))
    gap_s -= float(previous.get("api_time") or 0.0)
    return max(0.0, gap_s * 1000.0)


def load_kv_cache_tester(paths: Iterable[Path]) -> Iterator[dict[str, Any]]:
    """Sessions from files or folders of `*.json` (a file may also hold a list of sessions), in name
    order."""
    for path in paths:
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        if not files:
            raise TraceError(f"{path}: no *.json sessions")
        for file in files:
            try:
                data = json.loads(file.read_bytes())
            except (OSError, ValueError) as exc:
                raise TraceError(f"{file}: {exc}") from exc
            for session in data if isinstance(data, list) else [data]:
                if not isinstance(session, dict):
                    raise TraceError(f"{file}: a session is a JSON object")
                yield session


def write_rows(rows: Iterable[TraceRow], out: Path) -> int:
    """JSONL as the public traces write it: whole milliseconds as integers, and the session fields
    only on session rows."""
    count = 0
    with open(out, "wb") as handle:
        for row in rows:
            fields = msgspec.structs.asdict(row)
            if row.timestamp.is_integer():
                fields["timestamp"] = int(row.timestamp)
            if row.session_id is None:
                for name in ("session_id", "turn", "delay_ms", "stop"):
                    del fields[name]
            handle.write(_encoder.encode(fields) + b"\n")
            count += 1
    return count
