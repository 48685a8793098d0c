"""A busy worker's step, as a request sent there waits for it: the pool's typical step and in-flight
context, and the rest of the step in progress on one worker (router/policies/session_kv.py, "One-shot
traffic"; docs/SESSION_KV.md).

A worker's outputs mark its step ends: first tokens and completions come back when a step ends, and a
step carrying prefill ends with its first tokens, so the end of the step in progress is predicted from
the last one seen (`WorkerLoad.step_end_at`, `step_prefill`, `last_step`).
"""

from __future__ import annotations

from router.load import WorkerLoad
from router.policies.base import RouterView


class BusyStep:
    """The pool's busy step, recomputed at most every 100 ms (load reports arrive at about that pace)."""

    def __init__(self) -> None:
        self._pool = (0.0, 1.0)  # (ms of a busy worker's step, in-flight context blocks of one)
        self._until = float("-inf")

    def pool(self, view: RouterView) -> tuple[float, float]:
        """A busy worker's step in ms (the median over the workers that reported running requests: their
        running requests over their decode tokens/s) and the in-flight context blocks of one (the median
        over those with requests in flight)."""
        now = view.now
        if now < self._until:
            return self._pool
        loads = view.load.workers
        steps: list[float] = []
        contexts: list[int] = []
        for w in view.candidates:
            wl = loads[w]
            report = wl.report
            if report is not None and now <= wl.fresh_until and report.running and report.decode_tok_s > 0:
                steps.append(1000.0 * report.running / report.decode_tok_s)
            if wl.requests:
                contexts.append(wl.inflight_blocks)
        steps.sort()
        contexts.sort()
        step = steps[(len(steps) - 1) // 2] if steps else 0.0
        context = max(1.0, float(contexts[(len(contexts) - 1) // 2])) if contexts else 1.0
        self._pool = (step, context)
        self._until = now + 0.1
        return self._pool

    @staticmethod
    def wait_ms(wl: WorkerLoad, now: float, step: float, context: float, per_token: float) -> float:
        """What a request sent to the busy worker `wl` now waits for its own step to end, beside its own
        prefill: the rest of the step in progress (`left_ms`), then the decodes its step carries, a pool
        step (`step`, ms) scaled by the worker's in-flight context over a busy worker's (`context`)."""
        decode = step * wl.inflight_blocks / context
        return BusyStep.left_ms(wl, now, decode, step, per_token) + decode

    @staticmethod
    def left_ms(wl: WorkerLoad, now: float, decode: float, step: float, per_token: float) -> float:
        """What a request sent to this busy worker now waits before its step begins: the rest of the
        step begun at the latest step end seen there. One carrying prefill lasts as the latest prefill
        step seen whole, give or take the marginal cost of the tokens in which they differ; past its
        predicted end (its first tokens are late) half a step is left. One with decodes only lasts a
        decode step; past that end the next ones go unseen (no output comes back before a completion),
        so a whole step, as the request may arrive just after one began."""
        current = min(wl.step_prefill, wl.inflight_prefill)
        elapsed = (now - wl.step_end_at) * 1000.0
        if not current:
            return decode - elapsed if elapsed < decode else decode
        if wl.last_step is not None:
            tokens, ms = wl.last_step
            length = ms + per_token * (current - tokens)
        else:
            length = decode + per_token * current
        return length - elapsed if elapsed < length else 0.5 * step
