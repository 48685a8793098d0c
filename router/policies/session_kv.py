"""`session_kv` (ours, the default): the worker with the lowest estimated time to first token.

Per worker: TTFT = (prefill queued ahead of the request + prefill of the prompt tokens it does not
hold) / its measured prefill speed. Held tokens: the device-tier prefix counts fully, a longer host-tier
prefix `host_credit`, a longer disk-tier one `disk_credit`. The session's own worker is credited the
blocks routed there within `prior_ttl_s` (events may lag the route), and wins whenever it is within the
affinity tolerance of the best. A prefix every worker holds (system prompt, tool definitions) credits
them all alike, so the queue decides and no single worker turns hot.
"""

from __future__ import annotations

from router.index import common_prefix
from router.policies.base import Policy, RouterView
from router.request import Decision, RouteRequest


class SessionKv(Policy):
    name = "session_kv"

    def pick(self, request: RouteRequest, view: RouterView) -> Decision:
        cfg = self.config
        chain = request.block_hashes
        bs = view.block_size
        n_tokens = request.num_tokens
        now = view.now
        overlap = view.overlap(chain)
        session = view.session
        sticky = None
        if session is not None and session.worker_id is not None:
            sticky = session.worker_id
            if now - session.last_pick_at <= cfg.prior_ttl_s:
                prior = common_prefix(session.chain, chain)
                if prior > overlap.get(sticky, 0):
                    overlap = dict(overlap)
                    overlap[sticky] = prior
        credit = self._credit(overlap, view.tier_overlap(chain, "host"), view.tier_overlap(chain, "disk"))

        stale = now - cfg.report_stale_s
        default_speed = cfg.default_prefill_tok_s
        loads = view.load.workers
        costs: dict[str, float] = {}
        for w in view.candidates:
            wl = loads[w]
            report = wl.report
            if report is not None and wl.report_at >= stale:
                queued = report.active_prefill_tokens + wl.prefill_since_report
            else:
                queued = wl.inflight_prefill
            speed = report.prefill_tok_s if report is not None and report.prefill_tok_s > 0 else default_speed
            held = credit.get(w)
            missing = n_tokens - held * bs if held else n_tokens
            costs[w] = (queued + (missing if missing > 0 else 0)) * 1000.0 / speed
        return self._choose(costs, overlap, sticky, view)

    def _choose(
        self, costs: dict[str, float], overlap: dict[str, int], sticky: str | None, view: RouterView
    ) -> Decision:
        best_cost = min(costs.values())
        cfg = self.config
        if sticky is not None and sticky in costs:
            tolerance = max(cfg.affinity_tolerance_ms, cfg.affinity_tolerance_rel * best_cost)
            if costs[sticky] <= best_cost + tolerance:
                return Decision(sticky, overlap.get(sticky, 0), costs[sticky], "session")
        tied = [w for w, c in costs.items() if c == best_cost]
        if len(tied) > 1:
            requests = view.load.requests
            key = max((overlap.get(w, 0), -requests(w)) for w in tied)
            tied = [w for w in tied if (overlap.get(w, 0), -requests(w)) == key]
        worker = tied[0] if len(tied) == 1 else self.rng.choice(tied)
        matched = overlap.get(worker, 0)
        return Decision(worker, matched, costs[worker], "overlap" if matched else "load")

    def _credit(
        self, device: dict[str, int], host: dict[str, int], disk: dict[str, int]
    ) -> dict[str, int] | dict[str, float]:
        """Blocks held per worker, lower tiers credited for what they hold beyond the tiers above."""
        if not host and not disk:
            return device
        credit: dict[str, float] = {w: float(n) for w, n in device.items()}
        for w in host.keys() | disk.keys():
            d, h, k = device.get(w, 0), host.get(w, 0), disk.get(w, 0)
            host_extra, disk_extra = max(0, h - d), max(0, k - max(d, h))
            credit[w] = d + self.config.host_credit * host_extra + self.config.disk_credit * disk_extra
        return credit
