"""Retrying something that is down without flooding the log: one line when it goes down, one when it
is back, a delay that doubles between tries (so a NATS outage is two log lines, not one a second)."""

from __future__ import annotations

import logging


class Outage:
    def __init__(
        self, log: logging.Logger, what: str, first_delay_s: float = 0.5, max_delay_s: float = 10.0
    ) -> None:
        self.log = log
        self.what = what
        self.first_delay_s = first_delay_s
        self.max_delay_s = max_delay_s
        self.failures = 0

    @property
    def down(self) -> bool:
        return self.failures > 0

    def failed(self, detail: object) -> float:
        """Note a failed try; the seconds to wait before the next one."""
        self.failures += 1
        level = logging.WARNING if self.failures == 1 else logging.DEBUG
        self.log.log(level, "%s unreachable (%s); retrying with back-off, quietly", self.what, detail)
        return min(self.max_delay_s, self.first_delay_s * 2 ** (self.failures - 1))

    def recovered(self) -> None:
        if self.failures:
            self.log.info("%s reachable again after %d tries", self.what, self.failures + 1)
        self.failures = 0
