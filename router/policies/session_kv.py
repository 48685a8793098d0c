"""`session_kv` (ours, the default): the worker with the lowest estimated time to first token.

Per worker: TTFT = (prefill queued ahead of the request + prefill of the prompt tokens it does not
hold) x the pool's prefill cost per token, plus a memory-pressure term. Held tokens: the device-tier
prefix counts fully, but on a worker jammed for device memory only as far as it will survive the
prompts queued there before the request (`credit_survives_queue`), a longer host- or disk-tier prefix
saves its prefill at the cost of copying it back (the link time its worker announces; where that copy
holds up the step, it stalls it as prefill would), or, from a worker that does not say, `host_credit`
/ `disk_credit` of a device block. The session's own worker is credited the blocks routed there
within `prior_ttl_s` (events may lag the route) or still pinned there (the pin hint `on_complete`
returned), and wins whenever it is within the affinity tolerance of the best. A prefix every worker
holds (system prompt, tool definitions) credits them all alike, so the queue decides and no single
worker turns hot.

The prefill cost per token is the median of the workers' measured costs, not each worker's own: the
workers are alike, and a worker's measured speed mostly says whether its recent prefills were short
(a step's fixed cost dominates) or long, which would push sessions off the worker holding their cache.

Memory pressure: the contexts of the sessions routed to a worker within `live_session_s` are what it
must keep cached for their next turns. When they, plus this prompt, exceed `memory_free_fraction` of
the worker's KV blocks, the excess will be evicted and prefilled again by someone; the term charges
`memory_pressure_factor` x the prefill time of those excess blocks, so new and cold sessions go where
their context fits and live sessions stop evicting each other. Below that, `memory_balance_factor`
charges a little for every live block, so cold sessions spread by memory before any worker is full;
and blocks held by in-flight requests beyond the worker's capacity mean waiting for admission, charged
`inflight_pressure_factor` x their prefill time (docs/EXPERIMENTS.md has the measurements of each).

Stall: a turn's own TTFT is not all its prefill costs. Every step that carries a chunk of it is longer for
every request running on that worker, and while the worker's memory is full those requests hold their
blocks the longer, so every admission there waits too. The missing tokens are charged
`1 + stall_factor x running x fullness` times (fullness: in-flight blocks plus this prompt over the
worker's capacity, at most 1): a miss where many decode in a full worker is dear, one on an idle worker is
not, and a hit on a busy worker beats a miss on a slightly shorter queue. Each running request is stalled
in the currency of the estimate that placed it: a session's turn at the pool's average cost per token, a
one-shot request at the marginal cost (its TTFT estimate's price), a tenth of it for short questions.
Priced at the average, a session's miss on a worker serving documents looked 100x its prefill, and a
pool serving both split into session workers and document workers.

One-shot traffic (a request that continues no session: it named none, and its prompt extends no prompt
routed before; `router.request.is_one_shot`): the estimate above prices its prefill at the pool's
measured average cost per token, which carries a step's fixed cost (for short prompts several times the
cost one more token adds to a step) and ignores the running decodes a first token waits behind. Such a
request is priced instead by its TTFT: its own prefill and the prefill queued to ride the same step at
the marginal cost per token (`router/prefill_fit.py`, fitted from the first tokens), plus, on a busy
worker, the rest of the step in progress and the running decodes its step carries (scaled by their
context). The step in progress is read from the worker's outputs: first tokens and completions mark step
ends, and a step carrying prefill ends with its first tokens, so its end is predicted from the last one
seen (docs/SESSION_KV.md, "One-shot traffic"). A hot document is then copied to an idle worker when
waiting at its home costs more than the copy's prefill. Until the marginal cost is first fitted (the
warm-up), such a request goes by Dynamo's block cost, which needs nothing measured. With `copy_value`
(on), a copy of a hot prefix is also credited what it spares the requests after it (their number within
`live_session_s` x the share that would find every holder busy and the copy idle x a busy holder's
wait), while every hot prefix fits on every worker.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from functools import partial

from router.config import RouterConfig
from router.load import WorkerLoad
from router.policies.base import Policy, RouterView
from router.policies.busy_step import BusyStep
from router.policies.device_waits import DeviceWaits, Running
from router.policies.live_contexts import LiveContext, LiveContexts
from router.policies.prefix_copies import PrefixCopies
from router.policies.tier_credit import TierCredit
from router.policies.warmup_cost import WarmupCost
from router.prefix_match import common_prefix
from router.request import Decision, RouteRequest, is_one_shot

# in-flight prefills remembered (the newest), each compared with every prompt: enough for the requests
# routed within the few ms their KV events take to come back, and a bounded cost per pick
MAX_PENDING = 32
# requests in flight whose chains are kept (the newest): what a session's worker has in use already
MAX_RUNNING = 4096
# a turn that would wait for device memory moves to a worker with room only if that worker runs at most
# this many requests (`_nearly_idle`): one long decode holding its memory, not a crowd of sessions
IDLE_RUNNING = 1


class SessionKv(Policy):
    name = "session_kv"

    def __init__(self, config: RouterConfig, rng: random.Random) -> None:
        super().__init__(config, rng)
        self._live = LiveContexts(config.live_session_s, config.max_sessions)
        self._pool_speed = 0.0
        self._pool_speed_until = float("-inf")
        self._pool_speed_n = 0
        self._busy = BusyStep()
        # prefills routed whose blocks the workers' KV events may not show yet: request -> (worker, chain)
        self._pending: dict[str, tuple[str, Sequence[int]]] = {}
        # requests in flight until they complete: request -> (worker, chain)
        self._running: Running = {}
        self._waits = DeviceWaits(config, self._running, self._busy)
        # of which one-shot requests (`is_one_shot`), and how many per worker
        self._one_shot_ids: set[str] = set()
        self._one_shot_count: dict[str, int] = {}
        # until the marginal prefill cost is first known (`one_shot_warmup`), one-shot requests go by
        # Dynamo's cost (warmup_cost.py)
        self._warmup = WarmupCost(config.one_shot_warmup)
        # the prefixes one-shot requests come back to (documents): where their copies crowd the pool
        self._copies = PrefixCopies(config)
        self._tiers = TierCredit(config)

    def pick(self, request: RouteRequest, view: RouterView) -> Decision:
        chain = request.block_hashes
        overlap = self._with_prior(view, self._with_pending(view.overlap(chain), chain), chain)
        sticky, why = self._sticky(view, overlap, chain)
        self._live.expire(view.now)
        costs = self._estimates(request, view, overlap, sticky)
        if costs is None:
            credit, _ = self._credit(view, chain, overlap)
            return self._warmup_pick(request, view, overlap, credit)
        best = min(costs.values())
        worker, reason, tolerance = "", why, 0.0
        if sticky is not None and sticky in costs:
            hold = self._affinity_tolerance_ms(request, view, overlap, costs, best, sticky, why)
            if hold is not None and costs[sticky] <= best + hold:
                worker, tolerance = sticky, hold
        if not worker:
            worker, tolerance = self._break_tie(view, overlap, costs, best), 0.0
            reason = "overlap" if overlap.get(worker) else "load"
        if self.config.memory_wait_move and not is_one_shot(request.session_id, view.session):
            room = self._out_of_memory_wait(request, view, overlap, costs, worker, tolerance)
            if room is not None:
                worker, reason = room, "memory"
        return self._decide(request, view, worker, overlap, costs, reason)

    def _out_of_memory_wait(
        self,
        request: RouteRequest,
        view: RouterView,
        overlap: dict[str, int],
        costs: dict[str, float],
        chosen: str,
        tolerance: float,
    ) -> str | None:
        """Where a named session's turn goes instead of `chosen` when it would wait there for running
        requests to free device memory (router/policies/memory_wait.py), or None: it stays. The estimate
        prices that wait as the prefill of the blocks over capacity (`inflight_pressure_factor`), where
        it lasts the running requests' remaining decodes: seconds, a minute behind a long one. Two ways
        out, each only where its estimate is below the chosen one's plus `memory_wait_move` x the wait
        (less the `tolerance` the session hold granted `chosen`: the wait joins its estimate, the hold
        stays as it was): the cheapest nearly idle worker (`_nearly_idle`) with room for the turn now,
        or the session's own worker (which the costs left because the turn did not fit there either)
        when its own predicted wait is the shorter and it runs no more requests than `chosen`. A busier
        worker is no way out: on a pool past its memory every move there spreads the wait to the
        sessions living there (docs/EXPERIMENTS.md, "Live, sixth pass")."""
        chain = request.block_hashes
        wait = self._waits.ms(view, chosen, chain)
        if wait <= 0.0:
            return None
        if len(costs) < len(view.candidates):  # the pruned ones too: a dearer worker may have room
            costs.update(self._estimates(request, view, overlap, None, everyone=True) or {})
        weight = self.config.memory_wait_move
        limit = costs[chosen] + weight * wait
        for w in sorted(costs, key=costs.__getitem__):
            if costs[w] + tolerance >= limit:
                break
            if w != chosen and self._nearly_idle(view, w) and not self._waits.ms(view, w, chain):
                return w
        if self.config.memory_wait_one_shot:
            beside = self._beside_one_shot(request, view, overlap, costs, chosen, limit - tolerance)
            if beside is not None:
                return beside
        home = view.session.worker_id if view.session is not None else None
        if (
            home is not None
            and home != chosen
            and home in costs
            and self._running_at(view, home) <= self._running_at(view, chosen)
            and costs[home] + weight * self._waits.ms(view, home, chain) < limit
        ):
            return home
        return None

    def _beside_one_shot(
        self,
        request: RouteRequest,
        view: RouterView,
        overlap: dict[str, int],
        costs: dict[str, float],
        chosen: str,
        limit: float,
    ) -> str | None:
        """The cheapest worker other than `chosen` that runs requests, all of them one-shot, where the turn
        fits now, if its estimate is below `limit`; its tokens priced at the pool's marginal cost (the
        price the one-shot estimate puts on them). A one-shot request's blocks free within its short
        decode, and its steps run anyway: the turn's prefill rides them at the marginal cost, where the
        pool's average cost per token, over short questions, is mostly their steps' fixed cost."""
        marginal = view.load.prefill_fit.ms_per_token
        if marginal is None:
            return None
        ms_per_token = self._pool_ms_per_token(view)
        if marginal >= ms_per_token:
            return None
        chain = request.block_hashes
        loads = view.load.workers
        credit, onboard = self._credit(view, chain, overlap)
        own = self._live.get(request.session_id) if request.session_id else None
        best, found = limit, None
        for w in view.candidates:
            wl = loads[w]
            if w == chosen or not wl.requests or self._one_shot_count.get(w, 0) < wl.requests:
                continue
            held = credit.get(w)
            cost = self._cost_ms(view, w, held, request.num_tokens, chain, own, ms_per_token, marginal)
            cost += onboard.get(w, 0.0)
            if cost < best and not self._waits.ms(view, w, chain):
                best, found = cost, w
        if found is not None:
            costs[found] = best
        return found

    @staticmethod
    def _nearly_idle(view: RouterView, w: str) -> bool:
        """`w` runs at most `IDLE_RUNNING` requests and has no prefill in flight: no admitted prompt
        about to take more blocks (the report counts those a prefill has so far), none queued."""
        wl = view.load.workers[w]
        report = wl.report
        return (
            report is not None
            and report.running <= IDLE_RUNNING
            and not report.waiting
            and not report.active_prefill_tokens
            and not wl.prefill_since_report
        )

    @staticmethod
    def _running_at(view: RouterView, w: str) -> float:
        """The requests running on `w`, by its load report (without one: unknown, as if a crowd)."""
        report = view.load.workers[w].report
        return report.running if report is not None else float("inf")

    def memory_waits(self, worker_id: str, view: RouterView) -> Callable[[Sequence[int]], float]:
        return self._waits.on(worker_id, view)

    def memory_wait_ms(self, chain: Sequence[int], worker_id: str, view: RouterView) -> float:
        return self._waits.ms(view, worker_id, chain)

    def _with_prior(self, view: RouterView, overlap: dict[str, int], chain: Sequence[int]) -> dict[str, int]:
        """The overlap, with the session's worker credited the prefix this turn shares with the session's
        last prompt while that was routed within `prior_ttl_s` or is still pinned there: its KV events
        may not have arrived yet."""
        session = view.session
        if session is None or session.worker_id is None:
            return overlap
        now = view.now
        if now - session.last_pick_at <= self.config.prior_ttl_s or now <= session.pinned_until:
            prior = common_prefix(session.chain, chain)
            if prior > overlap.get(session.worker_id, 0):
                overlap = dict(overlap)
                overlap[session.worker_id] = prior
        return overlap

    def _sticky(
        self, view: RouterView, overlap: dict[str, int], chain: Sequence[int]
    ) -> tuple[str | None, str]:
        """The worker that keeps the request within the affinity tolerance, and why: the session's own
        worker; else, on a sub-agent's first turn, its parent's worker when that worker holds part of
        the prefix they share (no prior credit: the parent's chain is the parent's, the index says what
        is left of it); else the prefix home, the first listed of the longest holders, when it holds at
        least half the prompt."""
        session = view.session
        if session is not None and session.worker_id is not None:
            return session.worker_id, "session"
        parent = view.parent
        if (
            parent is not None
            and parent.worker_id is not None
            and overlap.get(parent.worker_id, 0)
            and common_prefix(parent.chain, chain)
        ):
            return parent.worker_id, "parent"
        if overlap and self.config.prefix_home:
            home = max(overlap, key=overlap.__getitem__)
            if overlap[home] * 2 >= len(chain):
                return home, "overlap"
        return None, "load"

    def _estimates(
        self,
        request: RouteRequest,
        view: RouterView,
        overlap: dict[str, int],
        sticky: str | None,
        everyone: bool = False,
    ) -> dict[str, float] | None:
        """The candidates' estimated costs in ms: a one-shot request's by its TTFT once the marginal
        prefill cost is known, any other's by `_costs` (every candidate's with `everyone`, else those
        that can be the cheapest). None for a one-shot request in the warm-up, which `_warmup_pick`
        prices instead."""
        one_shot = self.config.one_shot_ttft and is_one_shot(request.session_id, view.session)
        marginal = view.load.prefill_fit.ms_per_token
        if marginal is not None and self._warmup.on:
            self._warmup.stop()  # the marginal cost is known from now on
        chain, sid = request.block_hashes, request.session_id
        n_tokens = request.num_tokens
        if one_shot and marginal is not None:
            credit, onboard = self._tiers.credit(view, chain, overlap, lambda: marginal)
            return self._one_shot_costs(view, credit, onboard, request, overlap, sticky)
        if one_shot and self._warmup.on:
            return None
        credit, onboard = self._credit(view, chain, overlap)
        if self.config.credit_survives_queue and credit is overlap:  # (no lower tier: device blocks)
            credit = self._surviving(view, chain, overlap)
        return self._costs(view, credit, onboard, n_tokens, chain, sid, sticky, everyone)

    def _surviving(self, view: RouterView, chain: Sequence[int], held: dict[str, int]) -> dict[str, int]:
        """The device prefix per worker that will still be there when the turn is admitted, where picks
        wait at the router for that worker's memory (`view.held_for`: a jam). The prompts queued there
        before the turn (prefilling, or held for it) take blocks for the tokens they compute out of
        those no running request holds, evicting cached ones as they go: of the turn's prefix only what
        fits in the rest is kept, and what a request in flight there holds (a shared system prompt).
        A jammed worker otherwise looked as if it still held a context that the prompts ahead would
        evict. Elsewhere the index's prefix stands: credited only as far as it survives everywhere, a
        session's turns left workers whose queues were passing and evicted other sessions' contexts
        on the workers they moved to (docs/EXPERIMENTS.md, "A cached prefix credited only as far as it
        survives the queue")."""
        jammed = view.held_for
        if not jammed:
            return held  # (most picks: nothing is held at the router)
        now, bs = view.now, view.block_size
        surviving = held
        for w, n in held.items():
            if w not in jammed:
                continue
            wl = view.load.workers.get(w)
            report = wl.report if wl is not None else None
            if wl is None or report is None or now > wl.fresh_until or report.host_blocks:
                continue  # no fresh report, or a host tier (which keeps what the device evicts)
            queued = wl.report_prefill + wl.prefill_since_report  # tokens, as `_cost_ms` queues them
            queued_blocks = -(-queued // bs)  # rounded up
            room = report.total_blocks - report.used_blocks - queued_blocks
            if n > room:
                if surviving is held:
                    surviving = dict(held)
                surviving[w] = max(room, self._in_use(w, chain), 0)
        return surviving

    def _affinity_tolerance_ms(
        self,
        request: RouteRequest,
        view: RouterView,
        overlap: dict[str, int],
        costs: dict[str, float],
        best: float,
        sticky: str,
        why: str,
    ) -> float | None:
        """How much dearer than the best the sticky worker may be and still get the request (None: it
        gets no preference)."""
        cfg = self.config
        tolerance = max(cfg.affinity_tolerance_ms, cfg.affinity_tolerance_rel * best)
        if why == "overlap" and is_one_shot(request.session_id, view.session):
            # one-shot traffic over a shared prefix (a document, a few-shot prompt) that the cheapest
            # worker lacks: its home keeps it until the home's queue is far longer, so each prefix is
            # served by one worker and each worker's KV in use holds few of them (fewer blocks in
            # use: faster steps for all). A prefix the cheapest worker holds too is no copy to spare.
            cheapest = min(costs, key=costs.__getitem__)
            spared = overlap[sticky] - overlap.get(cheapest, 0)
            crowded = self._copies.note(view, overlap, request.block_hashes, sticky, spared)
            if spared <= 0 and cfg.copy_value:
                # the cheapest worker holds the prefix as deeply: the home is one holder among others, and
                # a preference for it would leave idle the copies that spread the prefix's requests
                return None
            if spared > 0:
                held_ms = spared * view.block_size * self._pool_ms_per_token(view)
                hold = cfg.prefix_home_hold
                if crowded:
                    hold = max(hold, cfg.crowded_prefix_hold)
                tolerance = max(tolerance, hold * held_ms)
        if why == "session":
            chain = request.block_hashes
            tolerance = max(tolerance, self._session_hold_ms(view, overlap, costs, sticky, chain))
        return tolerance

    def _break_tie(
        self, view: RouterView, overlap: dict[str, int], costs: dict[str, float], best: float
    ) -> str:
        """The cheapest worker; among equal estimates the one with more cached prefix, then fewer
        requests, then chance."""
        tied = [w for w, c in costs.items() if c == best]
        if len(tied) > 1:
            requests = view.load.requests
            key = max((overlap.get(w, 0), -requests(w)) for w in tied)
            tied = [w for w in tied if (overlap.get(w, 0), -requests(w)) == key]
        return tied[0] if len(tied) == 1 else self.rng.choice(tied)

    def _warmup_pick(
        self,
        request: RouteRequest,
        view: RouterView,
        overlap: dict[str, int],
        credit: dict[str, int] | dict[str, float],
    ) -> Decision:
        """A one-shot request before the pool's marginal prefill cost is known: Dynamo's cost in blocks
        (warmup_cost.py), the lowest, ties at random."""
        chain = request.block_hashes
        costs = self._warmup.costs(view, chain, request.num_tokens, credit, self._running.values())
        best = min(costs.values())
        tied = [w for w, c in costs.items() if c == best]
        worker = tied[0] if len(tied) == 1 else self.rng.choice(tied)
        reason = "overlap" if overlap.get(worker) else "load"
        return self._decide(request, view, worker, overlap, costs, reason)

    def _session_hold_ms(
        self,
        view: RouterView,
        overlap: dict[str, int],
        costs: dict[str, float],
        worker: str,
        chain: Sequence[int],
    ) -> float:
        """How much dearer than the best a session's worker may be and keep the turn: `session_hold` x
        the prefill time of the context it holds that the cheapest worker lacks (on the device or a
        lower tier: a context offloaded to the host is one a move computes again), while the turn fits in
        the blocks its worker has free (the leading blocks a request in flight there holds already, a
        system prompt their sessions share, take no new ones). A move trades a passing queue for
        lasting work: the context is computed again elsewhere while its copy here holds memory until
        evicted, and on a loaded pool later turns wait behind that work. A turn that does not fit would
        wait for running requests to finish (seconds): then the costs alone decide, so a worker whose
        sessions outgrew it sheds some."""
        hold = self.config.session_hold
        if not hold:
            return 0.0
        cheapest = min(costs, key=costs.__getitem__)
        held = (
            self._tiers.held_anywhere(view, overlap, chain)
            if self.config.session_hold_lower_tiers
            else overlap
        )
        spared = held.get(worker, 0) - held.get(cheapest, 0)
        if spared <= 0:
            return 0.0
        bs = view.block_size
        wl = view.load.workers[worker]
        report = wl.report
        if report is not None and worker not in view.yielding:
            # (where decodes yield to prompts, a turn that does not fit preempts them: it keeps the hold)
            needed = self._used_blocks(wl, view.now, bs) + len(chain)
            capacity = report.total_blocks
            if view.now <= wl.fresh_until and needed - (-report.active_prefill_tokens // bs) > capacity:
                # the rest of the prompts in prefill there
                needed += self._waits.in_prefill_blocks(view, worker)
            if needed > capacity and needed - self._in_use(worker, chain) > capacity:
                return 0.0
        return hold * spared * bs * self._pool_ms_per_token(view)

    def _credit(
        self, view: RouterView, chain: Sequence[int], overlap: dict[str, int]
    ) -> tuple[dict[str, int] | dict[str, float], dict[str, float]]:
        """`TierCredit.credit` with a missing token at the pool's average price."""
        return self._tiers.credit(view, chain, overlap, partial(self._pool_ms_per_token, view))

    def _in_use(self, worker: str, chain: Sequence[int]) -> int:
        """The longest prefix of `chain` a request in flight on `worker` holds: blocks in use already
        (a system prompt its sessions share), which the turn takes no new blocks for."""
        longest = 0
        for other_worker, other in self._running.values():
            if other_worker == worker and other and other[0] == chain[0]:
                longest = max(longest, common_prefix(other, chain))
        return longest

    def _with_pending(self, overlap: dict[str, int], chain: Sequence[int]) -> dict[str, int]:
        """The index's overlap, plus the prefix each recent prefill still in flight shares with this
        chain on its worker: two requests over one new document a few ms apart land together, not
        each on its own worker (the events of the first arrive only after its prefill)."""
        pending = self._pending
        if not pending or not chain:
            return overlap
        credited = overlap
        first = chain[0]
        for worker, other in pending.values():
            if not other or other[0] != first:
                continue
            held = credited.get(worker, 0)
            # chained hashes: `other` shares more than `held` blocks with `chain` iff block `held` agrees,
            # one compare where the prefix walk costs ~1 us (in-flight prefills share a system prompt)
            if held < len(other) and held < len(chain) and other[held] == chain[held]:
                if credited is overlap:
                    credited = dict(overlap)
                credited[worker] = common_prefix(other, chain)
        return credited

    def on_pick(
        self, request: RouteRequest, decision: Decision, block_size: int, now: float, one_shot: bool
    ) -> None:
        pending = self._pending
        if len(pending) >= MAX_PENDING:
            del pending[next(iter(pending))]
        pending[request.request_id] = (decision.worker_id, request.block_hashes)
        running = self._running
        again = running.pop(request.request_id, None)  # a request routed again: its first pick is over
        if again is not None:
            self._forget_running(request.request_id, again)
        if len(running) >= MAX_RUNNING:
            oldest = next(iter(running))
            self._forget_running(oldest, running.pop(oldest))
        running[request.request_id] = (decision.worker_id, request.block_hashes)
        if one_shot:
            self._one_shot_ids.add(request.request_id)
            self._one_shot_count[decision.worker_id] = self._one_shot_count.get(decision.worker_id, 0) + 1
        self._warmup.count(decision.worker_id, request.block_hashes)

    def on_first_token(self, request_id: str) -> None:
        self._pending.pop(request_id, None)

    def on_complete(self, request_id: str) -> None:
        self._pending.pop(request_id, None)
        entry = self._running.pop(request_id, None)
        if entry is not None:
            self._forget_running(request_id, entry)

    def _forget_running(self, request_id: str, entry: tuple[str, Sequence[int]]) -> None:
        """A request in flight is over: it leaves the warm-up's count and the one-shot count."""
        self._warmup.forget(*entry)
        if request_id in self._one_shot_ids:
            self._one_shot_ids.discard(request_id)
            self._one_shot_count[entry[0]] -= 1

    def _costs(
        self,
        view: RouterView,
        credit: dict[str, int] | dict[str, float],
        onboard: dict[str, float],
        n_tokens: int,
        chain: Sequence[int],
        session_id: str | None,
        sticky: str | None,
        everyone: bool = False,
    ) -> dict[str, float]:
        """Estimated TTFT in ms plus the stall and memory terms, for every candidate that can be the
        cheapest (and the session's worker; all of them with `everyone`); the others are left out.
        `onboard`: ms a worker's copies from lower tiers keep the request waiting, beside the stall
        charge (`TierCredit.credit`)."""
        now = view.now
        bs = view.block_size
        loads = view.load.workers
        ms_per_token = self._pool_ms_per_token(view)
        # a lower bound of each TTFT first (the stall charge only adds), then the exact TTFT and the
        # memory terms cheapest first, stopping at the first bound above the best total found: 64
        # workers cost a few, not 64, full evaluations
        bound: dict[str, float] = {}
        for w in view.candidates:
            wl = loads[w]
            queued = (
                wl.report_prefill + wl.prefill_since_report if now <= wl.fresh_until else wl.inflight_prefill
            )
            held = credit.get(w)
            missing = n_tokens - held * bs if held else n_tokens
            bound[w] = (queued + (missing if missing > 0 else 0)) * ms_per_token
        for w, ms in onboard.items():
            if w in bound:
                bound[w] += ms
        own = self._live.get(session_id) if session_id else None
        costs: dict[str, float] = {}
        best = float("inf")
        for w in sorted(bound, key=bound.__getitem__):
            if bound[w] > best and not everyone:
                break
            cost = self._cost_ms(view, w, credit.get(w), n_tokens, chain, own, ms_per_token)
            cost = costs[w] = cost + onboard.get(w, 0.0)
            if cost < best:
                best = cost
        if sticky is not None and sticky in bound and sticky not in costs:
            cost = self._cost_ms(view, sticky, credit.get(sticky), n_tokens, chain, own, ms_per_token)
            costs[sticky] = cost + onboard.get(sticky, 0.0)
        return costs

    def _one_shot_costs(
        self,
        view: RouterView,
        credit: dict[str, int] | dict[str, float],
        onboard: dict[str, float],
        request: RouteRequest,
        overlap: dict[str, int],
        sticky: str | None,
    ) -> dict[str, float]:
        """Estimated TTFT in ms for a one-shot request (docstring "One-shot traffic"), less
        what a copy of its hot prefix is worth to the requests after it, plus the memory terms, for
        every candidate that can be the cheapest (and the prefix home)."""
        n_tokens, n_blocks, session_id = request.num_tokens, len(request.block_hashes), request.session_id
        bs = view.block_size
        loads = view.load.workers
        per_token = view.load.prefill_fit.ms_per_token or 0.0
        # the prefill of the step the request rides, at its marginal cost (a lower bound): its own and
        # the prefill queued there since the step in progress began
        bound: dict[str, float] = {}
        for w in view.candidates:
            wl = loads[w]
            held = credit.get(w)
            missing = n_tokens - held * bs if held else n_tokens
            queued = wl.inflight_prefill - min(wl.step_prefill, wl.inflight_prefill)
            bound[w] = (queued + (missing if missing > 0 else 0)) * per_token + onboard.get(w, 0.0)
        step, context = self._busy.pool(view)
        if self.config.copy_value and overlap:
            self._copies.credit(view, bound, overlap, request.block_hashes, step, context, per_token)
        own = self._live.get(session_id) if session_id else None
        ms_per_token = self._pool_ms_per_token(view)  # the memory terms: re-prefills, at the average cost
        own_excess = self.config.one_shot_own_excess
        now = view.now
        costs: dict[str, float] = {}
        best = float("inf")
        for w in sorted(bound, key=bound.__getitem__):
            if bound[w] > best and w != sticky:
                continue
            wl = loads[w]
            cost = bound[w]
            if wl.requests:  # the rest of the step in progress, then ours carries the worker's decodes
                cost += BusyStep.wait_ms(wl, now, step, context, per_token)
            used = self._used_blocks(wl, now, bs)
            memory = self._memory_ms(wl, w, n_blocks, own, bs, ms_per_token, used, own_excess=own_excess)
            cost = costs[w] = cost + memory
            if cost < best:
                best = cost
        return costs

    def _cost_ms(
        self,
        view: RouterView,
        w: str,
        held: float | None,
        n_tokens: int,
        chain: Sequence[int],
        own: LiveContext | None,
        ms_per_token: float,
        token_ms: float | None = None,
    ) -> float:
        """The worker's estimated TTFT with the stall charge, plus the memory terms; `token_ms`: the price
        of the prefill tokens, where it is not the pool's average cost (`ms_per_token`)."""
        now = view.now
        bs = view.block_size
        n_blocks = len(chain)
        wl = view.load.workers[w]
        queued = wl.report_prefill + wl.prefill_since_report if now <= wl.fresh_until else wl.inflight_prefill
        missing = n_tokens - held * bs if held else n_tokens
        if missing < 0:
            missing = 0
        report = wl.report
        used = self._used_blocks(wl, now, bs)
        stall_factor = self.config.stall_factor
        if stall_factor and report is not None and report.total_blocks > 0:
            # the running requests wait out this prefill too (the docstring's "Stall")
            running: float = report.running if now <= wl.fresh_until else wl.requests
            one_shot = self._one_shot_count.get(w, 0)
            if one_shot and wl.requests and not self.config.stall_counts_one_shot:
                # the running one-shot requests (their share of those in flight there) are stalled in
                # their own currency: the marginal cost of a token, as their estimate prices it
                share = min(1.0, one_shot / wl.requests)
                running *= 1.0 - share + share * self._one_shot_stall_weight(view, ms_per_token)
            floor = self.config.stall_fullness_floor
            full = ((used + n_blocks) / report.total_blocks - floor) / (1.0 - floor)
            if full > 0.0:
                missing *= 1.0 + stall_factor * running * (full if full < 1.0 else 1.0)
        in_use = self._parent_prefix_in_use(view, w, chain, used)
        memory = self._memory_ms(wl, w, n_blocks, own, bs, ms_per_token, used, w in view.yielding, in_use)
        return (queued + missing) * (ms_per_token if token_ms is None else token_ms) + memory

    def _parent_prefix_in_use(self, view: RouterView, w: str, chain: Sequence[int], used: float) -> int:
        """A sub-agent's first turn on its parent's worker: the leading blocks of its prompt that a
        request in flight there holds already (its parent's turn, whose context it was forked from),
        which it takes no new blocks for. Only where the turn would not fit otherwise (the in-flight
        pressure would charge them), and 0 with `parent_prefix_in_use` off. Counted whole, a child
        forked beside its parent's running turn looked as if it waited for memory there and prefilled
        the shared context elsewhere (docs/EXPERIMENTS.md, idea 19)."""
        parent = view.parent
        if not self.config.parent_prefix_in_use or parent is None or parent.worker_id != w:
            return 0
        report = view.load.workers[w].report
        if report is None or used + len(chain) <= report.total_blocks:
            return 0
        return self._in_use(w, chain)

    @staticmethod
    def _one_shot_stall_weight(view: RouterView, ms_per_token: float) -> float:
        """What stalling a running one-shot request weighs beside a session's turn: the pool's marginal
        cost per token over its average (at most 1; 1 until the marginal cost is fitted)."""
        marginal = view.load.prefill_fit.ms_per_token
        if marginal is None or marginal >= ms_per_token:
            return 1.0
        return marginal / ms_per_token

    def _used_blocks(self, wl: WorkerLoad, now: float, bs: int) -> float:
        """Blocks the worker's running requests hold: its report's count (blocks shared by several of
        them counted once) plus the prefill predicted since, while the report is fresh; else the blocks
        of the requests in flight (each counted whole)."""
        report = wl.report
        if self.config.used_from_report and report is not None and now <= wl.fresh_until:
            return report.used_blocks + wl.prefill_since_report / bs
        return wl.inflight_blocks

    def _memory_ms(
        self,
        wl: WorkerLoad,
        w: str,
        n_blocks: int,
        own: LiveContext | None,
        bs: int,
        ms_per_token: float,
        used: float,
        yields: bool = False,
        in_use: int = 0,
        own_excess: bool = False,
    ) -> float:
        """The memory terms in ms (docs/SESSION_KV.md, "memory(w)"). With `own_excess` (a one-shot
        request's), the live contexts' excess beyond `memory_free_fraction` is charged for at most this
        prompt's blocks: the rest is the sessions' own, there whether the request comes or not, and
        charged whole it sent every question away from the workers where sessions live."""
        block_ms = bs * ms_per_token
        cfg = self.config
        live = self._live.blocks_on(w)
        if own is not None and own.worker_id == w:
            live -= own.blocks  # the session's previous turn is this prompt's prefix, not extra
        ms = cfg.memory_balance_factor * live
        report = wl.report
        if report is not None:
            capacity = report.total_blocks
            excess = live + n_blocks - cfg.memory_free_fraction * capacity
            if own_excess and excess > n_blocks:
                excess = n_blocks
            if excess > 0:
                host = report.host_blocks if cfg.memory_counts_host else 0
                if host:
                    # what the device cannot keep waits on the host: a next turn onboards it, at
                    # `host_credit` of a block's prefill saved; beyond the host too, it is lost
                    kept = excess if excess < host else host
                    excess = (1.0 - cfg.host_credit) * kept + (excess - kept)
                ms += cfg.memory_pressure_factor * excess
            # running sequences hold their blocks: beyond the worker's capacity this one waits
            # (unless they yield to prompts: the router sends decodes apart there); `in_use` of its
            # blocks a request in flight there holds already
            busy = used + n_blocks - in_use - capacity
            if busy > 0 and not yields:
                ms += cfg.inflight_pressure_factor * busy
        return ms * block_ms

    def _pool_ms_per_token(self, view: RouterView) -> float:
        """The lower median of the candidates' measured prefill cost per token, recomputed at most
        every 100 ms (reports arrive at about that pace)."""
        if view.now < self._pool_speed_until and len(view.candidates) == self._pool_speed_n:
            return self._pool_speed
        loads = view.load.workers
        costs = sorted(loads[w].ms_per_token for w in view.candidates)
        self._pool_speed = costs[(len(costs) - 1) // 2]
        self._pool_speed_until = view.now + 0.1
        self._pool_speed_n = len(costs)
        return self._pool_speed

    def _decide(
        self,
        request: RouteRequest,
        view: RouterView,
        worker: str,
        overlap: dict[str, int],
        costs: dict[str, float],
        reason: str,
    ) -> Decision:
        cfg = self.config
        sid = request.session_id
        now = view.now
        session = view.session

        # a context is live where a session that came back keeps it: one-shot requests never do, and a
        # new session's first turn is placed by the others' footprints without adding its own yet
        after = cfg.live_after_turns
        live = after == 0 or (session is not None and session.turns >= after)
        if sid and (live or sid in self._live):
            self._live.picked(sid, worker, len(request.block_hashes), now)
        return Decision(worker, overlap.get(worker, 0), costs[worker], reason)

    def expire(self, now: float) -> None:
        self._live.expire(now)

    def remove_worker(self, worker_id: str) -> None:
        for rid in [rid for rid, entry in self._pending.items() if entry[0] == worker_id]:
            del self._pending[rid]
        for rid in [rid for rid, entry in self._running.items() if entry[0] == worker_id]:
            del self._running[rid]
            self._one_shot_ids.discard(rid)
        self._one_shot_count.pop(worker_id, None)
        self._warmup.remove_worker(worker_id)
        self._live.remove_worker(worker_id)
