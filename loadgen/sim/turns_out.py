"""`kvgate sim --turns FILE`: every replayed turn, one JSON line each, for reading where time went.

The summary table gives a policy's percentiles; a turn's own record says where its TTFT was spent:
waiting at the router (`sent_s - arrival_s`: a memory hold, an admission or a router queue) or at its
worker (`first_token_s - sent_s`: the engine's queue, onboarding, the prefill itself), on which worker,
with how much of its prompt cached. Grouped by worker, it shows a pool whose time is spent on a few
workers (docs/EXPERIMENTS.md reads the full Claude Code trace this way).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import msgspec

from loadgen.sim.metrics import RequestRecord


class TurnRow(msgspec.Struct):
    """One turn of one policy's replay; times in virtual seconds from the start of the trace, -1 for a
    moment the turn never reached (refused by its worker, or never answered)."""

    policy: str
    session: str
    turn: int
    worker: str
    arrival_s: float
    sent_s: float
    first_token_s: float
    finish_s: float
    ok: bool
    prompt_tokens: int
    cached_tokens: int
    host_cached_tokens: int
    output_tokens: int


def turn_rows(policy: str, records: Iterable[RequestRecord]) -> list[TurnRow]:
    """The rows of one replay, in arrival order."""
    return [
        TurnRow(
            policy=policy,
            session=r.session,
            turn=r.turn,
            worker=r.worker,
            arrival_s=r.arrival,
            sent_s=r.sent,
            first_token_s=r.first_token,
            finish_s=r.finish,
            ok=r.ok,
            prompt_tokens=r.prompt_tokens,
            cached_tokens=r.cached_tokens,
            host_cached_tokens=r.host_cached_tokens,
            output_tokens=r.output_tokens,
        )
        for r in sorted(records, key=lambda r: r.arrival)
    ]


def write_turns(path: str | Path, runs: dict[str, Iterable[RequestRecord]]) -> int:
    """Write every policy's turns to `path` as JSON lines (policies in the order given); returns how
    many rows were written."""
    encoder = msgspec.json.Encoder()
    written = 0
    with Path(path).open("wb") as out:
        for policy, records in runs.items():
            for row in turn_rows(policy, records):
                out.write(encoder.encode(row) + b"\n")
                written += 1
    return written
