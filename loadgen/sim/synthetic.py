"""The load generator's workloads (`agentic`, `chat`, `prefix`) as trace rows, for `kvgate sim --workload`.

Each session is played through: every turn's messages are rendered in ChatML as the byte tokenizer would
see them (one token per byte), the model's reply is `max_tokens` characters of the workload's text (as a
run with `--ignore-eos` gives), and the next turn is the workload's answer to that reply. A row's hash ids
are the chained hashes of its prompt's blocks of `block_size` tokens, so prompts that share a prefix in
the workload share it in the simulation, to the block.
"""

from __future__ import annotations

import random
from typing import Any

import msgspec

from loadgen import workloads
from loadgen.text import TextSource
from loadgen.trace import TraceRow
from router.hashing import block_hashes_of_bytes, tokens_to_bytes

WORKLOADS = ("agentic", "chat", "prefix")
# `kvgate sim --workload prefix+chat --rate 40,2`: workloads played together, rows merged by arrival
MIX_SEPARATOR = "+"


def make_workload(name: str, rate: float, seed: int, max_context_tokens: int | None) -> Any:
    """The loadgen workload of that name with its defaults (tools as text, as `--plain-tools`)."""
    if name == "agentic":
        config = workloads.AgenticConfig(plain_tools=True, max_context_tokens=max_context_tokens)
        return workloads.AgenticWorkload(config, rate, seed)
    if name == "chat":
        return workloads.ChatWorkload(workloads.ChatConfig(max_context_tokens=max_context_tokens), rate, seed)
    if name == "prefix":
        return workloads.PrefixWorkload(workloads.PrefixConfig(), rate, seed)
    raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")


def render(messages: list[dict[str, Any]]) -> bytes:
    """ChatML, ending with the assistant's header: what a byte-tokenizer worker would prefill."""
    parts = [f"<|im_start|>{m['role']}\n{m.get('content') or ''}<|im_end|>\n" for m in messages]
    return ("".join(parts) + "<|im_start|>assistant\n").encode()


def workload_rows(
    workload: Any, duration_s: float, block_size: int, seed: int = 0, reply_tokens: int | None = None
) -> list[TraceRow]:
    """Every turn of the sessions that start within `duration_s`, as rows (sessions closed-loop). Each
    reply folded into the next prompt is `reply_tokens` long (None: its turn's `max_tokens`)."""
    text = TextSource(seed + 1)
    rng = random.Random(seed)
    rows: list[TraceRow] = []
    open_loop = workload.name == "prefix"  # single requests: no session id, as the load generator sends
    for offset, session in workload.sessions():
        if offset > duration_s:
            break
        turn = session.next_turn(None)
        index = 0
        while turn is not None:
            prompt = render(turn.messages)
            hashes = block_hashes_of_bytes(tokens_to_bytes(list(prompt)), block_size)
            if rows and index and turn.tool_result:  # the previous turn ended in a tool call
                rows[-1] = msgspec.structs.replace(rows[-1], stop="tool_use")
            rows.append(
                TraceRow(
                    timestamp=offset * 1000.0,
                    input_length=len(prompt),
                    output_length=turn.max_tokens,
                    hash_ids=hashes,
                    session_id=None if open_loop else session.session_id,
                    turn=index,
                    delay_ms=turn.delay_s * 1000.0,
                    stop="end_turn",
                )
            )
            reply = turn.max_tokens if reply_tokens is None else reply_tokens
            turn = session.next_turn(text.text(reply, rng))
            index += 1
    return rows


def parse_mix(spec: str, rates: list[float]) -> list[tuple[str, float]]:
    """`prefix+chat` with rates `[40, 2]` as [("prefix", 40.0), ("chat", 2.0)]: one rate per workload,
    or one rate for all; ValueError on an unknown or repeated name or a count that does not match."""
    names = spec.split(MIX_SEPARATOR)
    for name in names:
        if name not in WORKLOADS:
            raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}, joined by +")
    if len(set(names)) != len(names):
        raise ValueError(f"workload {spec!r}: a workload is named twice")
    if len(rates) == 1:
        rates = rates * len(names)
    if len(rates) != len(names):
        raise ValueError(f"workload {spec!r}: {len(names)} workloads but {len(rates)} rates")
    return list(zip(names, rates, strict=True))


def mixed_rows(
    mix: list[tuple[str, float]],
    duration_s: float,
    block_size: int,
    seed: int,
    max_context_tokens: int | None,
) -> list[TraceRow]:
    """The rows of several workloads at their rates, merged by arrival (each session's turns in order):
    sessions beside one-shot traffic, as a pool serving both sees them. Each workload draws from its own
    generator of the same seed, so a mix's rows of one workload are those of that workload alone."""
    rows: list[TraceRow] = []
    for name, rate in mix:
        workload = make_workload(name, rate, seed, max_context_tokens)
        rows.extend(workload_rows(workload, duration_s, block_size, seed))
    rows.sort(key=lambda row: row.timestamp)  # stable: a session's turns keep their order
    return rows
