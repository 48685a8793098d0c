"""The approximate index: routed requests' blocks per worker, expiring, kept prefix-closed."""

from __future__ import annotations

from router.approx_index import ApproxIndex


def test_approximate_index_expires_by_ttl_and_stays_prefix_closed() -> None:
    approx = ApproxIndex(ttl_s=10.0, max_blocks_per_worker=50)
    approx.add_worker("a")
    approx.add_worker("b")
    long_chain = list(range(1, 41))
    approx.insert("a", long_chain, now=0.0)
    approx.insert("b", long_chain[:5], now=5.0)
    assert approx.overlap(long_chain) == {"a": 40, "b": 5}
    approx.insert("a", [*long_chain[:20], 900, 901], now=6.0)  # refreshes the first 20 only
    assert approx.overlap(long_chain) == {"a": 40, "b": 5}
    approx.insert("a", list(range(2000, 2020)), now=7.0)  # 62 > 50: the 12 oldest (tail) blocks go
    assert approx.overlap(long_chain) == {"a": 28, "b": 5}
    approx.expire(15.0)
    assert approx.overlap(long_chain) == {"a": 20}
    approx.expire(17.0)
    assert approx.overlap(long_chain) == {}
    approx.remove_worker("a")
    assert len(approx) == 0
