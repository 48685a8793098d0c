"""Per-request and per-session records, and the summary computed from them."""

from __future__ import annotations

import math
from collections import Counter, deque
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

RUNNING_WINDOW = 2000  # completed requests behind the live percentiles


class RequestRecord(msgspec.Struct):
    """One request; times in seconds from the start of the run."""

    session_id: str
    turn: int
    label: str
    start: float
    end: float
    ok: bool
    status: int
    ttft: float | None = None
    e2e: float | None = None
    itl_mean: float | None = None
    output_tokens: int = 0
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    host_cached_tokens: int = 0  # of cached_tokens, those a kvgate worker onboarded from its host tier
    finish_reason: str | None = None
    worker: str | None = None  # the kvgate worker that served it (its x-kvgate-worker header)
    delay: float = 0.0  # think time applied after the previous turn's end
    ready: float = 0.0  # when the session was allowed to send it (previous end + delay)
    tool_result: bool = False
    warmup: bool = False
    error: str | None = None
    # still in flight when the run ended (cancelled after the drain): not an error; its TTFT counts
    # when its first token came
    unfinished: bool = False


class SessionRecord(msgspec.Struct):
    session_id: str
    label: str
    start: float
    end: float
    turns: int
    completed: bool  # ran to its natural end (no error, not stopped)


def _pct(values: Sequence[float] | np.ndarray, q: float, scale: float = 1.0) -> float | None:
    if len(values) == 0:
        return None
    return round(float(np.percentile(values, q)) * scale, 3)


class Recorder:
    """Collects records, all token gaps (for ITL percentiles) and a running window for the display."""

    def __init__(self, warmup_s: float = 0.0) -> None:
        self.warmup_s = warmup_s
        self.requests: list[RequestRecord] = []
        self.sessions: list[SessionRecord] = []
        self.sessions_started = 0
        self.in_flight = 0
        self.sent = 0
        self._itl: list[float] = []
        self.recent_ttft: deque[float] = deque(maxlen=RUNNING_WINDOW)
        self.recent_e2e: deque[float] = deque(maxlen=RUNNING_WINDOW)
        self.errors = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0

    def add_request(self, record: RequestRecord, itl: Sequence[float]) -> None:
        record.warmup = record.start < self.warmup_s
        self.requests.append(record)
        if record.unfinished:
            return
        if not record.ok:
            self.errors += 1
            return
        if record.ttft is not None:
            self.recent_ttft.append(record.ttft)
        if record.e2e is not None:
            self.recent_e2e.append(record.e2e)
        if not record.warmup:
            self._itl.extend(itl)
        if record.prompt_tokens:
            self.prompt_tokens += record.prompt_tokens
            self.cached_tokens += record.cached_tokens or 0

    def add_session(self, record: SessionRecord) -> None:
        self.sessions.append(record)

    def summary(self, wall_s: float, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        return summarize(self.requests, self.sessions, self._itl, self.sessions_started, wall_s, extra)


def summarize(
    requests: Sequence[RequestRecord],
    sessions: Sequence[SessionRecord],
    itl: Sequence[float],
    sessions_started: int,
    wall_s: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The run's figures over the measured (non-warm-up) requests."""
    measured = [r for r in requests if not r.warmup]
    done = [r for r in measured if r.ok]
    failed = [r for r in measured if not r.ok and not r.unfinished]
    unfinished = [r for r in measured if r.unfinished]
    window = max(r.end for r in measured) - min(r.start for r in measured) if measured else 0.0
    summary: dict[str, Any] = {
        "requests": len(measured),
        "completed": len(done),
        "errors": len(failed),
        # in flight when the run ended: those with a first token count in the TTFT figures, those
        # without in none (they waited longer than the run allowed, so the TTFT percentiles they would
        # raise are lower bounds then)
        "unfinished": len(unfinished),
        "unfinished_before_first_token": sum(1 for r in unfinished if r.ttft is None),
        "error_statuses": dict(Counter(str(r.status) for r in failed)),
        "warmup_requests": len(requests) - len(measured),
        "duration_s": round(window, 3),
        "wall_s": round(wall_s, 3),
        "request_rate": round(len(done) / window, 3) if window > 0 else 0.0,
        **_latencies(done, [r for r in unfinished if r.ttft is not None], itl),
        **_sent_ttft(done, unfinished),
        **_tokens(done, window),
        **_sessions(sessions, sessions_started),
    }
    if extra:
        summary.update(extra)
    return summary


def _latencies(
    done: Sequence[RequestRecord], started: Sequence[RequestRecord], itl: Sequence[float]
) -> dict[str, Any]:
    """`started`: requests left unfinished after their first token (their TTFT counts, not their e2e)."""
    ttft = np.array([r.ttft for r in [*done, *started] if r.ttft is not None])
    e2e = np.array([r.e2e for r in done if r.e2e is not None])
    itl_arr = np.asarray(itl, dtype=float)
    return {
        "ttft_mean_ms": round(float(ttft.mean()) * 1e3, 3) if len(ttft) else None,
        "ttft_p50_ms": _pct(ttft, 50, 1e3),
        "ttft_p90_ms": _pct(ttft, 90, 1e3),
        "ttft_p99_ms": _pct(ttft, 99, 1e3),
        "itl_p50_ms": _pct(itl_arr, 50, 1e3),
        "itl_p90_ms": _pct(itl_arr, 90, 1e3),
        "itl_p99_ms": _pct(itl_arr, 99, 1e3),
        "e2e_p50_ms": _pct(e2e, 50, 1e3),
        "e2e_p90_ms": _pct(e2e, 90, 1e3),
        "e2e_p99_ms": _pct(e2e, 99, 1e3),
    }


def _sent_ttft(done: Sequence[RequestRecord], unfinished: Sequence[RequestRecord]) -> dict[str, Any]:
    """TTFT percentiles over every request sent that did not fail, one still waiting for its first
    token when the run ended counted at its wait so far. The plain percentiles leave those out, which
    flatters a system that leaves more turns unserved (a closed loop sends it fewer, earlier turns);
    here a percentile is exact where every such wait is at least as long as the order statistics it
    reads, and otherwise a lower bound, named in `lower_bounds`."""
    served = np.array([r.ttft for r in [*done, *unfinished] if r.ttft is not None])
    waits = np.array([r.end - r.start for r in unfinished if r.ttft is None])
    figures: dict[str, Any] = {"lower_bounds": []}
    for q in (50, 90, 99):
        key = f"ttft_sent_p{q}_ms"
        figure = censored_percentile(served, waits, q)
        figures[key] = None if figure is None else round(figure[0] * 1e3, 3)
        if figure is not None and not figure[1]:
            figures["lower_bounds"].append(key)
    return figures


def censored_percentile(observed: np.ndarray, waits: np.ndarray, q: float) -> tuple[float, bool] | None:
    """The `q` percentile of `observed` values and right-censored `waits` (each true value is at least
    its wait), and whether it is exact: linear interpolation reads the order statistics at the floor
    and ceiling of q% x (n - 1), so it is exact when the observed values alone fill those ranks with
    values no longer than any wait; otherwise a longer true wait could raise it."""
    values = np.concatenate([observed, waits])
    if not len(values):
        return None
    value = float(np.percentile(values, q))
    upper = math.ceil(q / 100 * (len(values) - 1))
    if not len(waits):
        return value, True
    return value, upper < len(observed) and float(np.sort(observed)[upper]) <= float(waits.min())


def _tokens(done: Sequence[RequestRecord], window: float) -> dict[str, Any]:
    output_tokens = sum(r.output_tokens for r in done)
    with_usage = [r for r in done if r.prompt_tokens]
    prompt_tokens = sum(r.prompt_tokens or 0 for r in with_usage)
    cached_tokens = sum(r.cached_tokens or 0 for r in with_usage)
    host_cached_tokens = sum(r.host_cached_tokens for r in with_usage)
    return {
        "output_tokens": output_tokens,
        "output_tok_s": round(output_tokens / window, 3) if window > 0 else 0.0,
        "prompt_tokens": prompt_tokens,
        "cached_tokens": cached_tokens,
        # None when the server reports no usage: "unknown" must not read as "no hits"
        "cache_hit_rate": round(cached_tokens / prompt_tokens, 4) if prompt_tokens else None,
        # by tier: on the worker's device, or onboarded from its host memory (kvgate workers say which;
        # other servers' cached tokens all count as device)
        "device_cached_tokens": cached_tokens - host_cached_tokens,
        "host_cached_tokens": host_cached_tokens,
        "device_cache_hit_rate": round((cached_tokens - host_cached_tokens) / prompt_tokens, 4)
        if prompt_tokens
        else None,
        "host_cache_hit_rate": round(host_cached_tokens / prompt_tokens, 4) if prompt_tokens else None,
    }


def _sessions(sessions: Sequence[SessionRecord], sessions_started: int) -> dict[str, Any]:
    finished = [s for s in sessions if s.completed]
    session_time = np.array([s.end - s.start for s in finished])
    return {
        "sessions": sessions_started,
        "sessions_completed": len(finished),
        "session_time_p50_s": _pct(session_time, 50),
        "session_time_p90_s": _pct(session_time, 90),
        "turns_per_session_mean": round(float(np.mean([s.turns for s in sessions])), 3) if sessions else None,
    }


def running_figures(recorder: Recorder) -> dict[str, float | None]:
    """Percentiles over the last completed requests, for the live display."""
    ttft = np.fromiter(recorder.recent_ttft, dtype=float)
    e2e = np.fromiter(recorder.recent_e2e, dtype=float)
    hit = recorder.cached_tokens / recorder.prompt_tokens if recorder.prompt_tokens else None
    return {
        "ttft_p50_ms": _pct(ttft, 50, 1e3),
        "ttft_p90_ms": _pct(ttft, 90, 1e3),
        "ttft_p99_ms": _pct(ttft, 99, 1e3),
        "e2e_p50_ms": _pct(e2e, 50, 1e3),
        "cache_hit_rate": hit,
    }
