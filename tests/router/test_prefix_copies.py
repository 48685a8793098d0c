"""Copies of hot prefixes: when one more crowds the pool, and what one is worth
(router/policies/prefix_copies.py)."""

from __future__ import annotations

import pytest

from router.approx_index import ApproxIndex
from router.config import RouterConfig
from router.index import BlockIndex
from router.load import LoadView
from router.policies.base import RouterView
from router.policies.prefix_copies import HOT_GROUP_BLOCKS, PrefixCopies
from router.protocol import LoadReport

BS = 16


def view(used: dict[str, int], total: int = 1000, now: float = 0.0) -> RouterView:
    """Two workers with `total` blocks each, their running requests using `used` of them."""
    config = RouterConfig()
    load = LoadView(config)
    for w, n in used.items():
        load.add_worker(w)
        load.apply(LoadReport(w, now, 1 if n else 0, 0, 0, n, total, 5_000.0, 100.0), now)
    return RouterView(list(used), BlockIndex(), ApproxIndex(60.0, 1000), load, None, BS, now)


def test_a_copy_crowds_the_pool_once_the_hot_copies_and_the_blocks_in_use_pass_its_blocks() -> None:
    copies = PrefixCopies(RouterConfig())
    doc = list(range(100, 100 + 10 * HOT_GROUP_BLOCKS))
    home_only = {"w0": len(doc)}
    # one copy of an 80-block document, one more of 80, and 1,800 of 2,000 blocks in use: 1,960 fit
    assert not copies.note(view({"w0": 900, "w1": 900}), home_only, doc, "w0", len(doc))
    # 1,850 in use: 80 + 80 + 1,850 do not; the copy would evict another hot prefix
    assert copies.note(view({"w0": 950, "w1": 900}), home_only, doc, "w0", len(doc))
    # nothing to copy (the cheapest worker holds it too), or the rule off: never crowded
    assert not copies.note(view({"w0": 950, "w1": 900}), home_only, doc, "w0", 0)
    off = PrefixCopies(RouterConfig(crowded_prefix_hold=0.0))
    assert not off.note(view({"w0": 950, "w1": 900}), home_only, doc, "w0", len(doc))


def test_a_prefix_is_keyed_at_whole_groups_of_blocks() -> None:
    # requests whose held prefix runs a block or two into their (alike) questions count as one prefix
    copies = PrefixCopies(RouterConfig())
    doc = list(range(100, 100 + 4 * HOT_GROUP_BLOCKS + 2))
    for extra in (0, 1, 2):
        copies.note(view({"w0": 0, "w1": 0}), {"w0": 4 * HOT_GROUP_BLOCKS + extra}, doc, "w0", 0)
    assert copies.hot.blocks == 4 * HOT_GROUP_BLOCKS  # one prefix, one copy
    assert copies.hot.requests(doc[4 * HOT_GROUP_BLOCKS - 1], 0.0) == pytest.approx(3.0)


def test_no_credit_while_a_holder_is_idle_or_the_prefix_is_not_the_prompts_bulk() -> None:
    copies = PrefixCopies(RouterConfig())
    doc = list(range(100, 100 + 8 * HOT_GROUP_BLOCKS))
    pool = view({"w0": 0, "w1": 0})
    for _ in range(5):
        copies.note(pool, {"w0": len(doc)}, doc, "w0", len(doc))
    bound = {"w0": 10.0, "w1": 50.0}
    copies.credit(pool, bound, {"w0": len(doc)}, doc, 10.0, 100.0, 0.015)
    assert bound == {"w0": 10.0, "w1": 50.0}  # the home runs nothing: the request goes there
    question = doc + list(range(9_000, 9_000 + len(doc) + 1))  # the document is under half the prompt
    copies.credit(pool, bound, {"w0": len(doc)}, question, 10.0, 100.0, 0.015)
    assert bound == {"w0": 10.0, "w1": 50.0}
