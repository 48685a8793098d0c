"""PNG charts of one run or several side by side (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from loadgen.metrics import RequestRecord

CHARTS = {
    "ttft_cdf": "ttft_cdf.png",
    "ttft_time": "ttft_over_time.png",
    "cache_time": "cache_hit_over_time.png",
    "throughput_time": "throughput_over_time.png",
}

Run = tuple[str, Sequence[RequestRecord]]  # label, rows


def _bin_width(runs: Sequence[Run]) -> float:
    span = max((max((r.end for r in rows), default=0.0) for _, rows in runs), default=0.0)
    return max(1.0, span / 60)  # about 60 points per line


def _bins(rows: Sequence[RequestRecord], width: float) -> tuple[np.ndarray, np.ndarray]:
    ends = np.array([r.end for r in rows])
    edges = np.arange(0.0, (ends.max() if len(ends) else 0.0) + width, width)
    if len(edges) < 2:
        edges = np.array([0.0, width])
    return ends, edges


def _legend(ax: plt.Axes) -> None:
    if ax.get_legend_handles_labels()[0]:  # an empty run has no lines to label
        ax.legend()


def _save(fig: plt.Figure, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ttft_cdf(runs: Sequence[Run], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, rows in runs:
        ttft = np.sort([r.ttft * 1e3 for r in rows if r.ok and not r.warmup and r.ttft is not None])
        if len(ttft):
            ax.plot(ttft, np.arange(1, len(ttft) + 1) / len(ttft), label=label)
    ax.set_xscale("log")
    ax.set(xlabel="time to first token (ms, log)", ylabel="fraction of requests", title="TTFT CDF")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax)
    _save(fig, path)


def ttft_over_time(runs: Sequence[Run], path: Path) -> None:
    width = _bin_width(runs)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, rows in runs:
        ok = [r for r in rows if r.ok and r.ttft is not None]
        ends, edges = _bins(ok, width)
        ttft = np.array([r.ttft * 1e3 for r in ok if r.ttft is not None])  # all of them; mypy cannot tell
        index = np.digitize(ends, edges) - 1
        centers, p50, p90 = [], [], []
        for i in range(len(edges) - 1):
            values = ttft[index == i]
            if len(values):
                centers.append(edges[i] + width / 2)
                p50.append(np.percentile(values, 50))
                p90.append(np.percentile(values, 90))
        (line,) = ax.plot(centers, p50, label=f"{label} p50")
        ax.plot(centers, p90, linestyle="--", color=line.get_color(), label=f"{label} p90")
    ax.set(xlabel=f"time (s, {width:g} s bins)", ylabel="TTFT (ms)", title="TTFT over time")
    ax.grid(True, alpha=0.3)
    _legend(ax)
    _save(fig, path)


def cache_hit_over_time(runs: Sequence[Run], path: Path) -> None:
    width = _bin_width(runs)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, rows in runs:
        ok = [r for r in rows if r.ok and r.prompt_tokens]
        ends, edges = _bins(ok, width)
        prompt, _ = np.histogram(ends, edges, weights=[r.prompt_tokens or 0 for r in ok])
        cached, _ = np.histogram(ends, edges, weights=[r.cached_tokens or 0 for r in ok])
        has = prompt > 0
        ax.plot((edges[:-1] + width / 2)[has], cached[has] / prompt[has], label=label)
    ax.set_ylim(0, 1.02)
    ax.set(
        xlabel=f"time (s, {width:g} s bins)",
        ylabel="cached / prompt tokens",
        title="Cache hit rate over time",
    )
    ax.grid(True, alpha=0.3)
    _legend(ax)
    _save(fig, path)


def throughput_over_time(runs: Sequence[Run], path: Path) -> None:
    width = _bin_width(runs)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for label, rows in runs:
        ok = [r for r in rows if r.ok]
        ends, edges = _bins(ok, width)
        count, _ = np.histogram(ends, edges)
        tokens, _ = np.histogram(ends, edges, weights=[r.output_tokens for r in ok])
        centers = edges[:-1] + width / 2
        top.plot(centers, count / width, label=label)
        bottom.plot(centers, tokens / width, label=label)
    top.set(ylabel="requests/s", title="Throughput over time")
    bottom.set(xlabel=f"time (s, {width:g} s bins)", ylabel="output tokens/s")
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
        _legend(ax)
    _save(fig, path)


def write_charts(runs: Sequence[Run], out: Path) -> list[Path]:
    paths = [out / name for name in CHARTS.values()]
    ttft_cdf(runs, paths[0])
    ttft_over_time(runs, paths[1])
    cache_hit_over_time(runs, paths[2])
    throughput_over_time(runs, paths[3])
    return paths
