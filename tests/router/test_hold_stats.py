"""HoldStats: the report every router-side hold keeps (held, of which overdue, seconds waited)."""

from __future__ import annotations

from router.hold_stats import HoldStats


def test_counts_holds_and_sums_the_waits_of_those_let_go() -> None:
    stats = HoldStats()
    for _ in range(3):
        stats.record_hold()
    stats.record_release(1.5, overdue=False)
    stats.record_release(10.0, overdue=True)  # the third is still held (or was cancelled): not recorded
    assert stats == HoldStats(held_total=3, overdue_total=1, hold_s=11.5)
