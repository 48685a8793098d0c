"""What to make of an exception nats-py hands a connection's `error_cb`.

nats-py reports two kinds there: the connection's own trouble (refused, closed, stale, a slow
consumer), which the disconnect and reconnect callbacks already say once, and an exception raised by
one of our subscription callbacks, which nothing else reports: a bug in a handler, to be seen.
"""

from __future__ import annotations

import asyncio
import logging

import nats.errors

# nats.errors.Error is also the base of JetStream's errors; a lost socket raises OSError
CONNECTION_ERRORS = (nats.errors.Error, OSError, asyncio.TimeoutError)


def log_nats_error(log: logging.Logger, exc: Exception, where: str = "NATS") -> None:
    """The connection's trouble at DEBUG; a failed message handler at WARNING, with its traceback."""
    if isinstance(exc, CONNECTION_ERRORS):
        log.debug("%s: %s", where, exc)
    else:
        log.warning("%s: a message handler failed: %r", where, exc, exc_info=exc)
