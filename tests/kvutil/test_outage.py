"""An outage is logged once when it starts and once when it ends, with a doubling, bounded delay."""

from __future__ import annotations

import logging

import pytest

from kvutil.outage import Outage


def test_one_warning_per_outage_and_a_bounded_doubling_delay(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.outage")
    outage = Outage(log, "NATS", first_delay_s=0.5, max_delay_s=4.0)
    with caplog.at_level(logging.INFO, logger="test.outage"):
        delays = [outage.failed("refused") for _ in range(6)]
        outage.recovered()
        outage.recovered()  # already up: says nothing
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    assert [r.levelname for r in caplog.records] == ["WARNING", "INFO"]
    assert not outage.down
