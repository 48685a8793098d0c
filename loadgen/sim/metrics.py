"""What one policy's replay measured: per-request records and their summary."""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec
import numpy as np


class RequestRecord:
    """One turn's life in the replay (times in virtual seconds)."""

    __slots__ = (
        "arrival",
        "cached_tokens",
        "finish",
        "first_token",
        "host_cached_tokens",
        "ok",
        "output_tokens",
        "prompt_tokens",
        "sent",
        "session",
        "turn",
        "worker",
    )

    def __init__(self, session: str, turn: int, arrival: float, prompt_tokens: int, worker: str) -> None:
        self.session = session
        self.turn = turn
        self.arrival = arrival
        self.prompt_tokens = prompt_tokens
        self.worker = worker
        self.sent = -1.0  # when the router sent it to its worker (later than arrival where it held it)
        self.first_token = -1.0
        self.finish = -1.0
        self.cached_tokens = 0
        self.host_cached_tokens = 0  # of which onboarded from a host tier
        self.output_tokens = 0
        self.ok = False


class PolicyResult(msgspec.Struct, omit_defaults=True):
    """The per-policy object of `kvgate sim --json` (`SimReport.policies`). `hit_rate` counts every
    cached prompt token; with a host tier, `device_hit_rate` and `host_hit_rate` split it by the tier it
    came from (absent without one, so that the JSON of a run without tiers is as before)."""

    requests: int
    completed: int
    ttft_mean_ms: float
    ttft_p50_ms: float
    ttft_p90_ms: float
    ttft_p99_ms: float
    e2e_mean_ms: float
    session_time_mean_s: float
    hit_rate: float
    throughput_tok_s: float
    load_cv: float
    device_hit_rate: float | None = None
    host_hit_rate: float | None = None


class LoadSample(msgspec.Struct, array_like=True):
    """A worker's load at one instant, for the load-over-time chart."""

    t: float
    worker: str
    running: int
    waiting: int
    used_blocks: int


def coefficient_of_variation(values: Sequence[float]) -> float:
    if not values:
        return 0.0
    mean = sum(values) / len(values)
    if mean <= 0:
        return 0.0
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return math.sqrt(var) / mean


def summarize(
    records: Sequence[RequestRecord], busy_s: Sequence[float], host_tier: bool = False
) -> PolicyResult:
    """Summary of one replay. A request that never finished counts in `requests`, not `completed`,
    and is left out of the latency figures (its failure is visible as requests - completed)."""
    done = [r for r in records if r.ok]
    ttft = np.array([(r.first_token - r.arrival) * 1000.0 for r in done]) if done else np.zeros(1)
    e2e = [(r.finish - r.arrival) * 1000.0 for r in done]
    prompt = sum(r.prompt_tokens for r in done)
    cached = sum(r.cached_tokens for r in done)
    host = sum(r.host_cached_tokens for r in done)
    sessions: dict[str, tuple[float, float]] = {}
    for r in done:
        first, last = sessions.get(r.session, (r.arrival, r.finish))
        sessions[r.session] = (min(first, r.arrival), max(last, r.finish))
    span = (max(r.finish for r in done) - min(r.arrival for r in done)) if done else 0.0
    output = sum(r.output_tokens for r in done)
    p50, p90, p99 = np.percentile(ttft, [50, 90, 99])
    return PolicyResult(
        requests=len(records),
        completed=len(done),
        ttft_mean_ms=round(float(ttft.mean()), 3),
        ttft_p50_ms=round(float(p50), 3),
        ttft_p90_ms=round(float(p90), 3),
        ttft_p99_ms=round(float(p99), 3),
        e2e_mean_ms=round(sum(e2e) / len(e2e), 3) if e2e else 0.0,
        session_time_mean_s=round(sum(b - a for a, b in sessions.values()) / len(sessions), 4)
        if sessions
        else 0.0,
        hit_rate=round(cached / prompt, 5) if prompt else 0.0,
        throughput_tok_s=round(output / span, 3) if span > 0 else 0.0,
        load_cv=round(coefficient_of_variation(busy_s), 5),
        device_hit_rate=(round((cached - host) / prompt, 5) if prompt else 0.0) if host_tier else None,
        host_hit_rate=(round(host / prompt, 5) if prompt else 0.0) if host_tier else None,
    )
