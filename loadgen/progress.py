"""Live progress while a run goes: a rich panel on a terminal, a plain line every few seconds otherwise."""

from __future__ import annotations

import asyncio
import sys

from rich.console import Console
from rich.live import Live
from rich.table import Table

from loadgen.driver import Driver
from loadgen.metrics import running_figures


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


class ProgressDisplay:
    def __init__(
        self, driver: Driver, title: str, console: Console | None = None, interval_s: float = 0.5
    ) -> None:
        self.driver = driver
        self.title = title
        self.console = console or Console(stderr=True)
        self.interval_s = interval_s if self.console.is_terminal else 5.0

    def _figures(self) -> dict[str, str]:
        rec = self.driver.recorder
        elapsed = self.driver.elapsed()
        done = len(rec.requests)
        running = running_figures(rec)
        hit = running["cache_hit_rate"]
        limit = self.driver.config.duration_s
        return {
            "elapsed": f"{elapsed:,.1f} s" + (f" / {limit:g} s" if limit else ""),
            "sent": f"{rec.sent:,}",
            "done": f"{done:,}",
            "errors": f"{rec.errors:,}",
            "in flight": f"{rec.in_flight:,}",
            "sessions": f"{rec.sessions_started:,}",
            "req/s": f"{done / elapsed:,.1f}" if elapsed > 0 else "-",
            "ttft p50/p90/p99 ms": " / ".join(
                _ms(running[k]) for k in ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms")
            ),
            "e2e p50 ms": _ms(running["e2e_p50_ms"]),
            "cache hit": "-" if hit is None else f"{hit:.1%}",
        }

    def _table(self) -> Table:
        table = Table(title=self.title, show_header=False, expand=False)
        table.add_column(style="bold")
        table.add_column(justify="right")
        for key, value in self._figures().items():
            table.add_row(key, value)
        return table

    async def run(self) -> None:
        """Until cancelled."""
        if self.console.is_terminal:
            with Live(self._table(), console=self.console, refresh_per_second=4, transient=False) as live:
                try:
                    while True:
                        await asyncio.sleep(self.interval_s)
                        live.update(self._table())
                except asyncio.CancelledError:
                    live.update(self._table())
                    raise
        else:
            while True:
                await asyncio.sleep(self.interval_s)
                line = "  ".join(f"{k}={v}" for k, v in self._figures().items())
                print(f"[loadgen] {line}", file=sys.stderr, flush=True)
