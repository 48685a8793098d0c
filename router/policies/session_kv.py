"""`session_kv` (ours, the default): the worker with the lowest estimated time to first token.

Per worker: TTFT = (prefill queued ahead of the request + prefill of the prompt tokens it does not
hold) / its measured prefill speed. Held tokens: the device-tier prefix counts fully, a longer host-tier
prefix `host_credit`, a longer disk-tier one `disk_credit`. The session's own worker is credited the
blocks routed there within `prior_ttl_s` (events may lag the route) or still pinned there (the pin
hint `on_complete` returned), and wins whenever it is within the affinity tolerance of the best. A
prefix every worker holds (system prompt, tool definitions) credits them all alike, so the queue
decides and no single worker turns hot.
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
            if now - session.last_pick_at <= cfg.prior_ttl_s or now <= session.pinned_until:
                prior = common_prefix(session.chain, chain)
                if prior > overlap.get(sticky, 0):
                    overlap = dict(overlap)
                    overlap[sticky] = prior
        credit = self._credit(overlap, view.tier_overlap(chain, "host"), view.tier_overlap(chain, "disk"))

        loads = view.load.workers
        best = float("inf")
        tied: list[str] = []
        for w in view.candidates:
            wl = loads[w]
            if now <= wl.fresh_until:
                queued = wl.report_prefill + wl.prefill_since_report
            else:
                queued = wl.inflight_prefill
            held = credit.get(w)
            missing = n_tokens - held * bs if held else n_tokens
            cost = (queued + (missing if missing > 0 else 0)) * wl.ms_per_token
            if cost < best:
                best = cost
                tied = [w]
            elif cost == best:
                tied.append(w)
        if sticky is not None and sticky in loads and sticky in view.candidates:
            cost = self._cost(sticky, view, credit, n_tokens)
            tolerance = max(cfg.affinity_tolerance_ms, cfg.affinity_tolerance_rel * best)
            if cost <= best + tolerance:
                return Decision(sticky, overlap.get(sticky, 0), cost, "session")
        if len(tied) > 1:  # equal estimates: more cached prefix, then fewer requests, then chance
            requests = view.load.requests
            key = max((overlap.get(w, 0), -requests(w)) for w in tied)
            tied = [w for w in tied if (overlap.get(w, 0), -requests(w)) == key]
        worker = tied[0] if len(tied) == 1 else self.rng.choice(tied)
        matched = overlap.get(worker, 0)
        return Decision(worker, matched, best, "overlap" if matched else "load")

    @staticmethod
    def _cost(w: str, view: RouterView, credit: dict[str, int] | dict[str, float], n_tokens: int) -> float:
        """Estimated TTFT in ms on one worker (the loop in `pick` inlines the same)."""
        wl = view.load.workers[w]
        queued = (
            wl.report_prefill + wl.prefill_since_report if view.now <= wl.fresh_until else wl.inflight_prefill
        )
        missing = max(0.0, n_tokens - credit.get(w, 0) * view.block_size)
        return (queued + missing) * wl.ms_per_token

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
