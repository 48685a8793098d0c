"""What a router-side hold reports: how many it ever held, how many of those left by its bound, and how
long they waited in all.

Each hold (router/admission.py, router/overload_queue.py, router/memory_hold.py, router/room.py,
router/dynamo_queue.py) keeps one, counts a request when it starts to wait and records its wait when
it is let go; one cancelled (its client gone) is counted held and never released. The simulator's
reports and the tests read it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class HoldStats:
    held_total: int = 0  # requests ever held
    overdue_total: int = 0  # of which let go by the hold bound rather than by the hold's own rule
    hold_s: float = 0.0  # seconds the let-go ones waited, in all

    def record_hold(self) -> None:
        self.held_total += 1

    def record_release(self, waited_s: float, overdue: bool) -> None:
        """One held request let go after `waited_s`; `overdue`: by the bound."""
        self.hold_s += waited_s
        if overdue:
            self.overdue_total += 1
