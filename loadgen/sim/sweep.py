"""`kvgate sim --host-multiples`: every policy at several host-tier sizes, one table and one chart.

Each point replays the workload once per policy (`compare`) with every worker's host tier at a multiple
of its device blocks (0: no tier, the plain replay). The table is a JSON object (`SweepReport`); the
chart puts TTFT mean and p90 against the host tier's size, one line per policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import msgspec

from loadgen.sim.compare import compare
from loadgen.sim.metrics import PolicyResult
from loadgen.sim.simulation import SimConfig
from loadgen.sim.workload import Workload


class SweepPoint(msgspec.Struct):
    """One host-tier size: every policy's result (as in `kvgate sim --json`)."""

    host_multiple: float  # host blocks per device block
    host_blocks: int  # per worker
    policies: dict[str, PolicyResult]


class SweepReport(msgspec.Struct):
    """`kvgate sim --host-multiples ... --json`: the sweep's table."""

    trace: str
    workers: int
    num_blocks: int  # device blocks per worker
    oracle_hit_rate: float
    ideal_ttft_mean_ms: float
    points: list[SweepPoint]


def parse_multiples(text: str) -> list[float]:
    """`0,1,2,4,8` -> [0.0, 1.0, 2.0, 4.0, 8.0]: distinct, non-negative, in the order given."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--host-multiples {text!r}: expected numbers separated by commas") from None
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise ValueError(f"--host-multiples {text!r}: expected distinct non-negative numbers")
    return values


def sweep_host_tier(
    trace_name: str | Path,
    workload: Workload,
    policies: Sequence[str],
    config: SimConfig,
    multiples: Sequence[float],
    jobs: int | None = None,
) -> SweepReport:
    """Replay every policy once per host-tier size (`multiple` x the device's blocks per worker)."""
    points: list[SweepPoint] = []
    report = None
    for multiple in multiples:
        host_blocks = round(multiple * config.num_blocks)
        point_config = msgspec.structs.replace(config, host_blocks=host_blocks)
        report, _runs, _runtime = compare(trace_name, workload, policies, point_config, jobs=jobs)
        points.append(SweepPoint(multiple, host_blocks, report.policies))
    assert report is not None, "parse_multiples gives at least one"
    return SweepReport(
        trace=report.trace,
        workers=config.workers,
        num_blocks=config.num_blocks,
        oracle_hit_rate=report.oracle_hit_rate,
        ideal_ttft_mean_ms=report.ideal_ttft_mean_ms,
        points=points,
    )


def _label(multiple: float) -> str:
    return "none" if multiple == 0 else f"{multiple:g}x"


def sweep_markdown(report: SweepReport) -> str:
    """The table as Markdown: one row per host size, per policy `TTFT mean / p90 ms, hit rate`."""
    names = list(report.points[0].policies)
    lines = [
        "| host tier | " + " | ".join(names) + " |",
        "| --- |" + " --- |" * len(names),
    ]
    for point in report.points:
        cells = [
            f"{p.ttft_mean_ms:,.0f} / {p.ttft_p90_ms:,.0f}, {p.hit_rate:.3f}"
            for p in (point.policies[n] for n in names)
        ]
        lines.append(f"| {_label(point.host_multiple)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_sweep_chart(report: SweepReport, path: str | Path) -> Path:
    """TTFT mean and p90 (log scale) against the host tier's size, one line per policy; the host sizes
    evenly spaced (they are usually 0, 1, 2, 4, 8 x), the ideal mean as a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    xs = list(range(len(report.points)))
    labels = [_label(p.host_multiple) for p in report.points]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, (metric, title) in zip(axes, (("ttft_mean_ms", "mean"), ("ttft_p90_ms", "p90")), strict=True):
        for name in report.points[0].policies:
            ys = [getattr(p.policies[name], metric) for p in report.points]
            ax.plot(xs, ys, marker="o", label=name, linewidth=2.2 if name == "session_kv" else 1.2)
        ax.axhline(report.ideal_ttft_mean_ms, color="grey", linestyle=":", label="ideal mean")
        ax.set_xticks(xs, labels)
        ax.set_yscale("log")
        ax.set_xlabel("host tier per worker (x its device KV blocks)")
        ax.set_title(f"TTFT {title}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("time to first token (ms, log)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"{report.trace}: {report.workers} workers x {report.num_blocks:,} device blocks")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
