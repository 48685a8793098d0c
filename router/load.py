"""Per-worker load: the workers' own reports plus the work this router sent since (in-flight predictions).

A pick adds its predicted prefill tokens (until the first token) and blocks (until completion) to the
chosen worker at once, so a burst of picks between two reports does not pile onto the same worker. A
report already counts what the worker received before it, so only predictions made after the latest
report are added to it. Reports older than `report_stale_s` are ignored (every in-flight prediction
counts instead), and predictions whose first token or completion never arrives expire.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from router.config import RouterConfig
from router.prefill_fit import PrefillFit
from router.protocol import LoadReport
from router.request import is_inferred


class InFlight:
    __slots__ = (
        "admitted_at",
        "blocks",
        "epoch",
        "first_token_at",
        "output_tokens",
        "picked_at",
        "preempted",
        "prefill_ahead",
        "prefill_tokens",
        "prefilling",
        "session_id",
        "tool_pending",
        "worker_id",
    )

    def __init__(
        self,
        worker_id: str,
        prefill_tokens: int,
        prefill_ahead: int,
        blocks: int,
        picked_at: float,
        epoch: int,
        output_tokens: int = 0,
    ) -> None:
        self.worker_id = worker_id
        self.prefill_tokens = prefill_tokens
        # prefill tokens the worker computes before or with this request's first token (PrefillFit)
        self.prefill_ahead = prefill_ahead
        self.blocks = blocks
        self.picked_at = picked_at
        self.epoch = epoch  # the worker's report epoch at pick time
        self.output_tokens = output_tokens  # the tokens it may decode (its max_tokens; 0: unknown)
        self.first_token_at: float | None = None  # when its decode began, once the router saw it
        # when the worker last admitted it to decode (its first token, or its return after a preemption)
        self.admitted_at = picked_at
        # its worker preempted it (RouterConfig.memory_wait_preempted): it waits there, holding no blocks
        self.preempted = False
        self.prefilling = True
        self.session_id: str | None = None  # the router's notes for on_complete
        self.tool_pending = False


class WorkerLoad:
    __slots__ = (
        "decoding",
        "epoch",
        "fresh_until",
        "inflight_blocks",
        "inflight_prefill",
        "last_step",
        "ms_per_token",
        "preempted",
        "prefill_since_report",
        "report",
        "report_prefill",
        "requests",
        "step_end_at",
        "step_prefill",
    )

    def __init__(self, default_prefill_tok_s: float) -> None:
        self.report: LoadReport | None = None
        self.fresh_until = float("-inf")  # the report's load counts until then
        self.report_prefill = 0
        self.ms_per_token = 1000.0 / default_prefill_tok_s  # prefill cost, measured once reported
        self.epoch = 0  # bumped by each report
        self.prefill_since_report = 0
        self.decoding: set[str] = set()  # requests past their first token, not completed
        # of which missing from its reports (RouterConfig.memory_wait_preempted) -> since when
        self.preempted: dict[str, float] = {}
        self.inflight_prefill = 0  # every prediction still prefilling
        self.inflight_blocks = 0
        self.requests = 0
        # the worker's steps as its outputs show them (router/policies/session_kv.py, "One-shot traffic"):
        # the latest step end seen, the prefill tokens the step begun then carries, and the latest
        # step seen whole with prefill in it (tokens, ms)
        self.step_end_at = float("-inf")
        self.step_prefill = 0
        self.last_step: tuple[int, float] | None = None


COMPACT_SLACK = 1024  # queue entries beyond twice the requests in flight before they are swept
# a decode missing from its worker's report this long is preempted there, not completed unseen: a report
# may lead the completion by the step in progress (a few hundred ms at most), a preemption lasts until
# other requests complete (seconds)
PREEMPT_CONFIRM_S = 0.5


class LoadView:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config
        self.workers: dict[str, WorkerLoad] = {}
        self._inflight: dict[str, InFlight] = {}
        self._prefill_queue: deque[tuple[float, str]] = deque()  # (picked_at, request id), pick order
        self._done_queue: deque[tuple[float, str]] = deque()
        self.prefill_fit = PrefillFit()  # the pool's marginal prefill cost, from the first tokens

    def add_worker(self, worker_id: str) -> None:
        self.workers.setdefault(worker_id, WorkerLoad(self.config.default_prefill_tok_s))

    def remove_worker(self, worker_id: str) -> None:
        self.workers.pop(worker_id, None)
        for rid in [rid for rid, f in self._inflight.items() if f.worker_id == worker_id]:
            del self._inflight[rid]

    def apply(self, report: LoadReport, now: float, held: Iterable[str] = ()) -> None:
        """The worker's latest report; `held`: the picks for it held at the router
        (router/memory_hold.py), which no report counts: still to come, as if picked after it."""
        w = self.workers.get(report.worker_id)
        if w is None:
            return
        if w.report is not None and report.ts < w.report.ts:
            return  # overtaken by a newer report
        w.report = report
        w.fresh_until = now + self.config.report_stale_s
        w.report_prefill = report.active_prefill_tokens
        speed = report.prefill_tok_s  # `prefill_speed` of this report, inline: 10 reports/s per worker
        w.ms_per_token = 1000.0 / (speed if speed > 0 else self.config.default_prefill_tok_s)
        w.epoch += 1
        w.prefill_since_report = 0
        for rid in held:
            f = self._inflight.get(rid)
            if f is not None and f.prefilling:
                f.epoch = w.epoch
                w.prefill_since_report += f.prefill_tokens
        if self.config.memory_wait_preempted and (len(w.decoding) > report.running or w.preempted):
            # a preempted request waits there: no more than the report's waiting (a completion the
            # router has not seen yet leaves it running fewer requests too, none waiting)
            self._note_preempted(w, min(len(w.decoding) - report.running, report.waiting), now)

    def _note_preempted(self, w: WorkerLoad, excess: int, now: float) -> None:
        """The worker runs fewer requests than this router saw decoding there, and as many more wait: it
        preempted that many of them for memory (an engine frees a running request's blocks and queues it
        again, first, when a decode needs a block and none is free), the last admitted first, as vLLM
        picks its victims. A report may also lead a completion by the step that produced it, so a request
        counts as preempted once that has lasted `PREEMPT_CONFIRM_S`. It holds no blocks until the worker
        takes it back, and its decode stopped: where it leaves that set, its decode clock resumes from
        the tokens it had, as if its first token came as much later as it waited (memory_wait.py)."""
        flights = self._inflight
        ranked = sorted(w.decoding, key=lambda rid: flights[rid].admitted_at, reverse=True)
        suspected = set(ranked[: max(0, excess)])
        for rid in [rid for rid in w.preempted if rid not in suspected]:
            f = flights[rid]
            since = w.preempted.pop(rid)
            if f.preempted:
                f.preempted = False
                if f.first_token_at is not None:
                    f.first_token_at += now - since
                f.admitted_at = now
        for rid in suspected:
            since = w.preempted.setdefault(rid, now)
            if now - since >= PREEMPT_CONFIRM_S:
                flights[rid].preempted = True

    # --- predictions

    def start(
        self,
        request_id: str,
        worker_id: str,
        prefill_tokens: int,
        blocks: int,
        now: float,
        output_tokens: int = 0,
    ) -> None:
        w = self.workers[worker_id]
        if request_id in self._inflight:
            self.finish(request_id)  # a reused id: the old prediction is over
        if len(self._inflight) >= self.config.max_inflight:
            self.finish(next(iter(self._inflight)))  # bounded: the oldest prediction goes first
        ahead = w.inflight_prefill + prefill_tokens  # the worker's queued prefill, then this request's
        flight = InFlight(worker_id, prefill_tokens, ahead, blocks, now, w.epoch, output_tokens)
        self._inflight[request_id] = flight
        w.prefill_since_report += prefill_tokens
        w.inflight_prefill += prefill_tokens
        w.inflight_blocks += blocks
        w.requests += 1
        self._prefill_queue.append((now, request_id))
        self._done_queue.append((now, request_id))
        # entries of finished requests wait for their TTL (15 min): kept to twice those in flight, or
        # a steady stream leaves ~150 bytes a request behind, up to 2 x max_inflight of them (~40 MB)
        if len(self._done_queue) > 2 * len(self._inflight) + COMPACT_SLACK:
            self._compact()

    def resend(self, request_id: str, now: float) -> None:
        """A pick held at the router (router/memory_hold.py) goes to its worker now: its prediction
        counts from now, as one picked now (after the worker's latest report, whose queue does not
        hold it; `apply` kept its prefill queued there meanwhile)."""
        f = self._inflight.get(request_id)
        if f is None:
            return
        f.picked_at = now
        self._prefill_queue.append((now, request_id))
        self._done_queue.append((now, request_id))

    def first_token(self, request_id: str, now: float | None = None) -> None:
        """The request's prefill is over; with `now`, its latency is a sample of the prefill cost."""
        f = self._inflight.get(request_id)
        if f is not None and f.prefilling:
            self._end_prefill(f)
            f.first_token_at = now
            w = self.workers.get(f.worker_id)
            if w is not None and self.config.memory_wait_preempted:
                w.decoding.add(request_id)
                if now is not None:
                    f.admitted_at = now
            if now is not None and w is not None:
                # a prefill picked before the last step end seen there rode the step it began: this
                # first token ends that step, which carried the prefill in flight then
                if w.step_prefill and f.picked_at <= w.step_end_at < now:
                    w.last_step = (w.step_prefill, (now - w.step_end_at) * 1000.0)
                self.step_ended(f.worker_id, now)
            if now is not None and now >= f.picked_at and self._fits(f):
                self.prefill_fit.observe(f.prefill_ahead, (now - f.picked_at) * 1000.0)

    def _fits(self, f: InFlight) -> bool:
        """Whether the request's first token is a sample of the marginal prefill cost: with
        `fit_one_shot_only`, only a request that named no session. A named session's turn may wait
        seconds for device memory behind running decodes, which its latency carries; over prompts of
        20,000-40,000 tokens a few such samples set the slope (0.2-0.6 ms a token where the one-shot
        requests' steps show 0.015)."""
        return not self.config.fit_one_shot_only or is_inferred(f.session_id)

    def finish(self, request_id: str) -> InFlight | None:
        f = self._inflight.pop(request_id, None)
        if f is None:
            return None
        if f.prefilling:
            self._end_prefill(f)
        w = self.workers.get(f.worker_id)
        if w is not None:
            w.decoding.discard(request_id)
            w.preempted.pop(request_id, None)
            w.inflight_blocks -= f.blocks
            w.requests -= 1
        return f

    def step_ended(self, worker_id: str, now: float) -> None:
        """A step of the worker ended now (a first token or a completion came from it): the prefill in
        flight there was sent before the next step began, so that step carries it."""
        w = self.workers.get(worker_id)
        if w is not None:
            w.step_end_at = now
            w.step_prefill = w.inflight_prefill

    def get(self, request_id: str) -> InFlight | None:
        return self._inflight.get(request_id)

    def expire(self, now: float) -> None:
        self._drain(self._prefill_queue, now - self.config.prefill_ttl_s, done=False)
        self._drain(self._done_queue, now - self.config.inflight_ttl_s, done=True)

    # --- what policies read

    def queued_prefill(self, worker_id: str, now: float) -> int:
        """Prefill tokens ahead of a new request on this worker."""
        w = self.workers[worker_id]
        if now <= w.fresh_until:
            return w.report_prefill + w.prefill_since_report
        return w.inflight_prefill

    def active_blocks(self, worker_id: str) -> int:
        """Blocks of the requests this router sent there and that have not completed (Dynamo's decode)."""
        return self.workers[worker_id].inflight_blocks

    def requests(self, worker_id: str) -> int:
        """Requests this router sent there that have not completed."""
        return self.workers[worker_id].requests

    def prefill_speed(self, worker_id: str) -> float:
        """Measured prefill tokens/s, or the configured default until the worker reported one."""
        report = self.workers[worker_id].report
        if report is not None and report.prefill_tok_s > 0:
            return report.prefill_tok_s
        return self.config.default_prefill_tok_s

    def _end_prefill(self, f: InFlight) -> None:
        f.prefilling = False
        w = self.workers.get(f.worker_id)
        if w is None:
            return
        w.inflight_prefill -= f.prefill_tokens
        if f.epoch == w.epoch:
            w.prefill_since_report -= f.prefill_tokens

    def _compact(self) -> None:
        """Forget queue entries of finished requests (they otherwise wait for their TTL)."""
        live = self._inflight
        for queue in (self._prefill_queue, self._done_queue):
            kept = [(t, rid) for t, rid in queue if rid in live and live[rid].picked_at == t]
            queue.clear()
            queue.extend(kept)

    def _drain(self, queue: deque[tuple[float, str]], cutoff: float, done: bool) -> None:
        while queue and queue[0][0] <= cutoff:
            picked_at, rid = queue.popleft()
            f = self._inflight.get(rid)
            if f is None or f.picked_at != picked_at:
                continue
            if done:
                self.finish(rid)
            elif f.prefilling:
                self._end_prefill(f)
