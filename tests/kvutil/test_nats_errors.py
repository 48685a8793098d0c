"""What a NATS connection's error callback logs: the connection's trouble quietly, a failed message
handler loudly (nats-py hands both to the same callback)."""

from __future__ import annotations

import logging

import nats.errors
import nats.js.errors
import pytest

from kvutil.nats_errors import log_nats_error

log = logging.getLogger("kvgate.test")


@pytest.mark.parametrize(
    "exc",
    [
        nats.errors.ConnectionClosedError(),
        nats.errors.NoRespondersError(),
        nats.js.errors.NotFoundError(),
        ConnectionRefusedError(111, "refused"),
        TimeoutError(),
    ],
)
def test_the_connections_trouble_is_a_debug_line(exc: Exception, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="kvgate.test"):
        log_nats_error(log, exc)
    assert [r.levelno for r in caplog.records] == [logging.DEBUG]


def test_a_failed_handler_is_a_warning_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    try:
        {}["missing"]
    except KeyError as exc:
        with caplog.at_level(logging.DEBUG, logger="kvgate.test"):
            log_nats_error(log, exc, "NATS (replication)")
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and record.exc_info is not None
    assert record.getMessage() == "NATS (replication): a message handler failed: KeyError('missing')"
