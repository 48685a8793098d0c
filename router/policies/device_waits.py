"""The predicted wait for device memory on each worker, as `session_kv` reads it from the router's view:
memory_wait.py's model fed with the worker's fresh load report, the requests this router has in flight
there and the prompts still in chunked prefill there (docs/SESSION_KV.md, "The choice").

A worker whose report is stale, or whose decodes yield to prompts (the router sends decodes apart
there), predicts no wait; so does a prompt that fits beside every request there with none waiting ahead,
without a walk over the flights (most picks).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from router.config import RouterConfig
from router.policies.base import RouterView
from router.policies.busy_step import BusyStep
from router.policies.memory_wait import MemoryWait
from router.protocol import LoadReport

# the requests in flight that the policy keeps: request id -> (its worker, its chain), in pick order
Running = dict[str, tuple[str, Sequence[int]]]


def _no_wait(chain: Sequence[int]) -> float:
    return 0.0


class DeviceWaits:
    def __init__(self, config: RouterConfig, running: Running, busy: BusyStep) -> None:
        self.config = config
        self._running = running  # the policy's record, read here, never written
        self._busy = busy

    def ms(self, view: RouterView, worker_id: str, chain: Sequence[int]) -> float:
        """The predicted wait for device memory of a prompt of `chain` on `worker_id` (ms)."""
        return self.on(worker_id, view)(chain)

    def on(self, worker_id: str, view: RouterView) -> Callable[[Sequence[int]], float]:
        """The predicted wait on `worker_id` of any prompt (ms), in one state (`view`): the flights are
        walked once, at the first prompt that needs them."""
        w = worker_id
        wl = view.load.workers[w]
        report = wl.report
        if report is None or view.now > wl.fresh_until or w in view.yielding:
            return _no_wait
        # (with none waiting, the blocks of the prompts in prefill there are their tokens to compute)
        in_prefill = self.in_prefill_blocks(view, w)
        # the longest prompt that fits at once: beside every request there, with none waiting ahead;
        # else beside them and every request this router sent there counted whole (prompt and output,
        # more than one can take while queued): a small prompt on a busy worker, most picks, then
        # skips the walk over the flights, a sixth of the gateway's CPU per request in `kvgate bench
        # gateway` (tests/router/test_device_waits.py pins the shortcut to the walk)
        fits = report.total_blocks - report.used_blocks - in_prefill
        if report.waiting or wl.prefill_since_report:
            fits -= wl.inflight_blocks
        walked: list[MemoryWait] = []

        def wait_ms(chain: Sequence[int]) -> float:
            if len(chain) < fits:  # (`MemoryWait.ms`: one block beyond its full ones)
                return 0.0
            if not walked:
                walked.append(self.walk(view, w, report, in_prefill))
            return walked[0].ms(chain)

        return wait_ms

    def walk(self, view: RouterView, w: str, report: LoadReport, in_prefill: int) -> MemoryWait:
        """The model over every request this router has in flight on `w` (none held at the router)."""
        # no measured pace there (its first prompt runs before its first decode step is measured):
        # the pool's, else the configured default; a step of 0 would predict no wait at all
        step_s = (
            report.running / report.decode_tok_s
            if report.running and report.decode_tok_s > 0
            else (self._busy.pool(view)[0] or self.config.default_decode_step_ms) / 1000.0
        )
        flights = view.load
        held = view.held
        mine = [
            (f, other)
            for rid, (worker, other) in self._running.items()
            if worker == w and rid not in held and (f := flights.get(rid)) is not None
        ]
        return MemoryWait(view.load.workers[w], mine, view.now, step_s, view.block_size, in_prefill)

    def in_prefill_blocks(self, view: RouterView, w: str) -> int:
        """The blocks the prompts admitted on `w` and still in chunked prefill will take beyond those its
        report counts (the blocks each has taken so far): its report's prefill tokens still to compute,
        less those of the prompts waiting there (the newest the router sent there before the report, as
        many as it says wait; a waiting prompt has computed nothing). 0 with `count_prefill_in_progress` off
        or no prefill in progress. A turn sent beside a long prompt's first chunk otherwise looks as if
        it fits, then waits for that prompt's decode (docs/EXPERIMENTS.md, idea 19)."""
        wl = view.load.workers[w]
        report = wl.report
        if not self.config.count_prefill_in_progress or report is None or not report.active_prefill_tokens:
            return 0
        bs = view.block_size
        tokens = report.active_prefill_tokens
        if report.waiting:
            flights = view.load
            sent = [  # in pick order, as the policy keeps them
                len(other)
                for rid, (worker, other) in self._running.items()
                if worker == w
                and (f := flights.get(rid)) is not None
                and f.prefilling
                and f.epoch != wl.epoch
            ]
            tokens -= bs * sum(sent[len(sent) - min(len(sent), report.waiting) :])
        return -(-tokens // bs) if tokens > 0 else 0
