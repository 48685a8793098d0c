"""The comparison: `kvgate sim --json`'s object, a rich table, and PNG charts."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from loadgen.sim.metrics import PolicyResult
from loadgen.sim.simulation import SimRun

if TYPE_CHECKING:  # imported where used: `kvgate sim` without --charts never loads matplotlib
    from matplotlib.figure import Figure
    from rich.console import JustifyMethod


class SimReport(msgspec.Struct):
    """`kvgate sim --json`: exactly these keys."""

    trace: str
    workers: int
    oracle_hit_rate: float
    ideal_ttft_mean_ms: float
    policies: dict[str, PolicyResult]


def render_table(report: SimReport, runtime_s: Mapping[str, float] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{report.trace}: {report.workers} workers, oracle hit rate {report.oracle_hit_rate:.3f}, "
        f"ideal TTFT {report.ideal_ttft_mean_ms:.0f} ms"
    )
    columns: list[tuple[str, JustifyMethod]] = [
        ("policy", "left"),
        ("done", "right"),
        ("TTFT mean", "right"),
        ("p50", "right"),
        ("p90", "right"),
        ("p99", "right"),
        ("e2e mean", "right"),
        ("session s", "right"),
        ("hit rate", "right"),
        ("tok/s", "right"),
        ("load cv", "right"),
        ("vs ideal", "right"),
    ]
    if runtime_s:
        columns.append(("sim s", "right"))
    for name, justify in columns:
        table.add_column(name, justify=justify)
    best = min((p.ttft_mean_ms for p in report.policies.values()), default=0.0)
    for name, p in report.policies.items():
        cells = [
            f"[bold]{name}[/bold]" if p.ttft_mean_ms == best else name,
            f"{p.completed}/{p.requests}",
            f"{p.ttft_mean_ms:,.0f}",
            f"{p.ttft_p50_ms:,.0f}",
            f"{p.ttft_p90_ms:,.0f}",
            f"{p.ttft_p99_ms:,.0f}",
            f"{p.e2e_mean_ms:,.0f}",
            f"{p.session_time_mean_s:,.1f}",
            f"{p.hit_rate:.3f}",
            f"{p.throughput_tok_s:,.0f}",
            f"{p.load_cv:.3f}",
            f"{p.ttft_mean_ms / report.ideal_ttft_mean_ms:.2f}x" if report.ideal_ttft_mean_ms else "-",
        ]
        if runtime_s:
            cells.append(f"{runtime_s.get(name, 0.0):.1f}")
        table.add_row(*cells)
    Console(width=max(Console().width, 150)).print(table)


def write_charts(report: SimReport, runs: Mapping[str, SimRun], directory: str | Path) -> list[Path]:
    """TTFT CDF per policy, hit rate per policy, per-worker load over time (one panel per policy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, run in runs.items():
        ttft = np.sort([(r.first_token - r.arrival) * 1000 for r in run.records if r.ok])
        if len(ttft):
            ax.plot(ttft, np.arange(1, len(ttft) + 1) / len(ttft), label=name)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (ms, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"TTFT CDF: {report.trace}, {report.workers} workers")
    ax.axvline(report.ideal_ttft_mean_ms, color="grey", linestyle=":", label="ideal mean")
    ax.legend()
    ax.grid(alpha=0.3)
    written.append(_save(fig, out / "ttft_cdf.png"))

    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(report.policies)
    ax.bar(names, [report.policies[n].hit_rate for n in names], color="tab:blue")
    ax.axhline(report.oracle_hit_rate, color="tab:red", linestyle="--", label="oracle (infinite cache)")
    ax.set_ylabel("cached prompt tokens / prompt tokens")
    ax.set_ylim(0, 1)
    ax.set_title(f"Prefix cache hit rate: {report.trace}")
    ax.legend()
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    written.append(_save(fig, out / "hit_rate.png"))

    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 2.2 * len(runs)), sharex=True, squeeze=False)
    for ax, (name, run) in zip(axes[:, 0], runs.items(), strict=True):
        by_worker: dict[str, list[tuple[float, int]]] = {}
        for s in run.load:
            by_worker.setdefault(s.worker, []).append((s.t, s.running + s.waiting))
        for wid, points in sorted(by_worker.items()):
            ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=0.7, label=wid)
        ax.set_ylabel("requests")
        ax.set_title(f"{name}: running + waiting per worker", fontsize=9)
    axes[-1, 0].set_xlabel("virtual time (s)")
    written.append(_save(fig, out / "worker_load.png"))
    return written


def _save(fig: Figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
