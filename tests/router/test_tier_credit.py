"""What a worker's lower tiers hold of a chain is worth to a turn (router/policies/tier_credit.py)."""

from __future__ import annotations

import msgspec
import pytest

from router.config import RouterConfig
from router.policies.tier_credit import TierCredit
from router.protocol import BlockStored, KvEventBatch, LoadReport
from tests.router.policy_cases import BS, chain, make, view_of


def _report(link_ms: float, onboard_async: bool) -> LoadReport:
    report = LoadReport("w0", 0.0, 1, 0, 0, 0, 1000, 10_000.0, 100.0, 4000, link_ms)
    return msgspec.structs.replace(report, onboard_async=onboard_async)


@pytest.mark.parametrize(
    ("link_ms", "onboard_async", "price"),
    [
        (0.0, False, (0.75, 0.0)),  # no link time announced: the configured host credit
        (0.16, False, (0.9, 0.0)),  # synchronous: the prefill saved less the copy, 1 - 0.16 / 1.6
        (0.16, True, (1.0, 0.16)),  # asynchronous: whole, its request waits for the copy
        (2.0, False, (0.0, 0.0)),  # a copy slower than the prefill it saves: worth nothing
    ],
)
def test_a_host_block_is_worth_the_prefill_it_saves_less_what_its_copy_holds_up(
    link_ms: float, onboard_async: bool, price: tuple[float, float]
) -> None:
    tiers = TierCredit(RouterConfig())
    value, wait = tiers.onboard_price(_report(link_ms, onboard_async), "host", 1.6)
    assert (value, wait) == pytest.approx(price)
    assert tiers.onboard_price(None, "disk", 1.6) == (RouterConfig().disk_credit, 0.0)


def test_the_device_prefix_stands_and_no_price_is_asked_where_no_worker_has_a_lower_tier() -> None:
    router = make("session_kv", n=2)
    prompt = chain(100)
    assert router.apply_kv_batch(KvEventBatch("w0", 1, 0, 0.0, [BlockStored(prompt[:60])]), 0.0)
    device = {"w0": 60}

    def no_price() -> float:
        raise AssertionError("priced a token with no lower tier in the pool")

    tiers = TierCredit(RouterConfig())
    view = view_of(router)
    assert tiers.credit(view, prompt, device, no_price) == (device, {})
    assert tiers.held_anywhere(view, device, prompt) is device


def test_a_host_copy_beyond_the_device_prefix_is_credited_at_its_price_and_held_whole() -> None:
    """w0 holds 40 blocks on its device and 100 on its host (synchronous link at 0.16 ms a block, a
    block's prefill 1.6 ms): 40 + 0.9 x 60 blocks credited; the prefix it serves without computing, 100."""
    router = make("session_kv", n=2)
    prompt = chain(100)
    stored = [BlockStored(prompt[:40]), BlockStored(prompt, None, "host")]
    assert router.apply_kv_batch(KvEventBatch("w0", 1, 0, 0.0, stored), 0.0)
    router.apply_load(_report(0.16, False), 0.0)
    tiers = TierCredit(RouterConfig())
    view = view_of(router)
    credit, onboard = tiers.credit(view, prompt, {"w0": 40}, lambda: 1.6 / BS)
    assert credit == pytest.approx({"w0": 40 + 0.9 * 60}) and onboard == {}
    assert tiers.held_anywhere(view, {"w0": 40}, prompt) == {"w0": 100}
