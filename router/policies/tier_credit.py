"""What a worker's lower tiers (host memory, disk) hold of a turn's chain is worth to the turn:
`session_kv`'s credit for blocks it onboards rather than computes (docs/SESSION_KV.md, "A hit on a lower
tier").

A block on a lower tier saves its prefill but is copied up over the worker's link first. Where that copy
holds up the step that admits the request (synchronous onboarding), it stalls the step's other requests
as the block's prefill would, so the block is credited as the prefill it saves less its link time. Where
the copy is asynchronous (vLLM's offloading connector), only its own request waits: the block is
credited whole and its link time is added to the request's wait beside the stall charge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from router.config import RouterConfig
from router.policies.base import RouterView
from router.protocol import LoadReport, Tier


class TierCredit:
    def __init__(self, config: RouterConfig) -> None:
        self.config = config

    @staticmethod
    def held_anywhere(view: RouterView, device: dict[str, int], chain: Sequence[int]) -> dict[str, int]:
        """The prefix per worker it serves without computing: on the device, or onboarded from a lower
        tier. `device` when no worker reports a lower tier."""
        host, disk = view.tier_overlap(chain, "host"), view.tier_overlap(chain, "disk")
        if not host and not disk:
            return device
        held = dict(device)
        for reach in (host, disk):
            for w, n in reach.items():
                if n > held.get(w, 0):
                    held[w] = n
        return held

    def credit(
        self,
        view: RouterView,
        chain: Sequence[int],
        device: dict[str, int],
        ms_per_token: Callable[[], float],
    ) -> tuple[dict[str, int] | dict[str, float], dict[str, float]]:
        """Blocks held per worker, lower tiers credited for what they hold beyond the tiers above, and
        the ms each worker's copies from those tiers keep the request waiting beside its stall charge;
        `ms_per_token` gives what the estimate prices a missing token at, asked only where a worker
        reports a lower tier. `device` itself, and no waits, where none does."""
        host = view.tier_overlap(chain, "host")
        disk = view.tier_overlap(chain, "disk")
        if not host and not disk:
            return device, {}
        block_ms = view.block_size * ms_per_token()
        loads = view.load.workers
        credit: dict[str, float] = {w: float(n) for w, n in device.items()}
        onboard: dict[str, float] = {}
        for w in host.keys() | disk.keys():
            d, h, k = device.get(w, 0), host.get(w, 0), disk.get(w, 0)
            host_extra, disk_extra = max(0, h - d), max(0, k - max(d, h))
            wl = loads.get(w)
            report = wl.report if wl is not None and self.config.price_onboarding else None
            host_value, host_wait = self.onboard_price(report, "host", block_ms)
            disk_value, disk_wait = self.onboard_price(report, "disk", block_ms)
            credit[w] = d + host_value * host_extra + disk_value * disk_extra
            wait = host_wait * host_extra + disk_wait * disk_extra
            if wait:
                onboard[w] = wait
        return credit, onboard

    def onboard_price(self, report: LoadReport | None, tier: Tier, block_ms: float) -> tuple[float, float]:
        """What one block on `tier` is worth, as (credit in device blocks, ms its request waits for it
        beside the stall charge), given the prefill it saves (`block_ms`) and its copy time over the
        worker's link (its load report; the module's docstring). A worker that announces no link time:
        the configured fraction."""
        link_ms = 0.0
        if report is not None:
            link_ms = report.host_block_ms if tier == "host" else report.disk_block_ms
        if not link_ms or block_ms <= 0.0:
            return (self.config.host_credit if tier == "host" else self.config.disk_credit), 0.0
        if report is not None and report.onboard_async:
            return 1.0, link_ms
        return max(0.0, 1.0 - link_ms / block_ms), 0.0
