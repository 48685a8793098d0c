"""session_kv's warm-up cost: Dynamo's block cost for one-shot requests (router/policies/warmup_cost.py)."""

from __future__ import annotations

from router.approx_index import ApproxIndex
from router.config import RouterConfig
from router.index import BlockIndex
from router.load import LoadView
from router.policies.base import RouterView
from router.policies.warmup_cost import WarmupCost

BS = 16


def chain(n: int, base: int = 1000) -> list[int]:
    return list(range(base, base + n))


def idle_view(workers: list[str]) -> RouterView:
    config = RouterConfig()
    load = LoadView(config)
    for w in workers:
        load.add_worker(w)
    return RouterView(workers, BlockIndex(), ApproxIndex(60.0, 1000), load, None, BS, 0.0)


def test_the_cost_is_prefill_blocks_plus_distinct_blocks_in_flight_with_the_prompt() -> None:
    warmup = WarmupCost(on=True)
    warmup.count("w0", chain(10))  # before the first one-shot request: not counted
    assert warmup.blocks is None
    doc = chain(10)
    # w0 runs a request over the document (the count starts from it); w1 runs nothing
    costs = warmup.costs(idle_view(["w0", "w1"]), doc + chain(2, base=50), 12 * BS, {"w0": 10}, [("w0", doc)])
    # w0: 2 blocks to prefill + 10 in flight + the 2 new ones; w1: 12 + 12
    assert costs == {"w0": 2 + 12, "w1": 12 + 12}
    warmup.count("w0", chain(12))  # shares the document: 12 distinct blocks in all
    assert len(warmup.blocks["w0"]) == 12
    warmup.forget("w0", chain(12))
    assert len(warmup.blocks["w0"]) == 10
    warmup.remove_worker("w0")
    assert "w0" not in warmup.blocks
    warmup.stop()  # the marginal cost is known: nothing is counted any more
    warmup.count("w1", chain(3))
    assert warmup.blocks is None and not warmup.on
