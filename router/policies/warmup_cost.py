"""One-shot requests before the pool's marginal prefill cost is known (`session_kv`'s warm-up,
`one_shot_warmup`): priced by NVIDIA Dynamo's KV router cost in blocks, `prefill blocks + distinct blocks
in flight with this prompt's` (its defaults: overlap weight 1, the lowest cost, ties at random).

It needs nothing measured: a miss and the blocks a busy worker's decodes read weigh alike, so a hot
document is copied to an idle worker while its home runs requests over other documents, and those
copies, made early, serve every request after. The average cost per token, the other estimate at hand,
prices a miss as if its tokens paid the step's fixed cost too (docs/EXPERIMENTS.md, idea 15).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from router.policies.active_blocks import ActiveBlocks
from router.policies.base import RouterView


class WarmupCost:
    """Whether the warm-up is on (`on`: from the start, with `one_shot_warmup`, until `stop`), and per
    worker the distinct blocks of the requests in flight there, counted from the warm-up's first one-shot
    request on (traffic of named sessions alone never pays for the count) until it ends."""

    def __init__(self, on: bool) -> None:
        self.on = on
        self.blocks: dict[str, ActiveBlocks] | None = None  # None: not counting

    def costs(
        self,
        view: RouterView,
        chain: Sequence[int],
        num_tokens: int,
        credit: dict[str, int] | dict[str, float],
        in_flight: Iterable[tuple[str, Sequence[int]]],
    ) -> dict[str, float]:
        """Each candidate's cost in blocks for a prompt of `chain` (`num_tokens`) with `credit` blocks
        held per worker. The first call starts the count from `in_flight`, the (worker, chain) of every
        request in flight; `count` and `forget` keep it from then on."""
        warm = self.blocks
        if warm is None:
            warm = self.blocks = {}
            for worker, other in in_flight:
                self.count(worker, other)
        bs = view.block_size
        loads = view.load.workers
        costs: dict[str, float] = {}
        for w in view.candidates:
            prefill = (loads[w].inflight_prefill + num_tokens) / bs - credit.get(w, 0)
            active = warm.get(w)
            potential = active.potential_blocks_of_prefix(chain) if active else len(chain)
            costs[w] = (prefill if prefill > 0.0 else 0.0) + potential
        return costs

    def count(self, worker: str, chain: Sequence[int]) -> None:
        """A request went to `worker` (counted while the count runs)."""
        warm = self.blocks
        if warm is None:
            return
        active = warm.get(worker)
        if active is None:
            active = warm[worker] = ActiveBlocks()
        active.add(chain)

    def forget(self, worker: str, chain: Sequence[int]) -> None:
        """A request in flight is over: its blocks leave its worker's count."""
        active = self.blocks.get(worker) if self.blocks is not None else None
        if active is not None:
            active.remove(chain)

    def remove_worker(self, worker: str) -> None:
        if self.blocks is not None:
            self.blocks.pop(worker, None)

    def stop(self) -> None:
        """The warm-up is over (the marginal cost is known): the count goes, for good."""
        self.on = False
        self.blocks = None
