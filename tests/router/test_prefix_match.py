"""Matched prefixes from per-block worker masks."""

from __future__ import annotations

import pytest

from router.prefix_match import common_prefix


@pytest.mark.parametrize(
    ("a", "b", "n"), [([1, 2, 3], [1, 2, 3, 4], 3), ([1, 2, 3], [1, 5, 6], 1), ([], [1], 0)]
)
def test_common_prefix(a: list[int], b: list[int], n: int) -> None:
    assert common_prefix(a, b) == n == common_prefix(b, a)
