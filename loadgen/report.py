"""results.json, report.md and charts for one run; a side-by-side report of several."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from loadgen.charts import CHARTS, write_charts
from loadgen.metrics import RequestRecord, SessionRecord


class Results(msgspec.Struct):
    summary: dict[str, Any]
    config: dict[str, Any]
    requests: list[RequestRecord]
    sessions: list[SessionRecord]


class ReportError(ValueError):
    pass


# rows of the summary table: key, label, format
SUMMARY_ROWS: list[tuple[str, str, str]] = [
    ("requests", "requests", "{:,}"),
    ("completed", "completed", "{:,}"),
    ("errors", "errors", "{:,}"),
    ("unfinished", "unfinished (in flight at the end)", "{:,}"),
    ("duration_s", "measured window (s)", "{:,.1f}"),
    ("request_rate", "requests/s", "{:,.1f}"),
    ("ttft_p50_ms", "TTFT p50 (ms)", "{:,.1f}"),
    ("ttft_p90_ms", "TTFT p90 (ms)", "{:,.1f}"),
    ("ttft_p99_ms", "TTFT p99 (ms)", "{:,.1f}"),
    ("ttft_sent_p50_ms", "TTFT p50, turns sent (ms)", "{:,.1f}"),
    ("ttft_sent_p90_ms", "TTFT p90, turns sent (ms)", "{:,.1f}"),
    ("itl_p50_ms", "ITL p50 (ms)", "{:,.2f}"),
    ("itl_p99_ms", "ITL p99 (ms)", "{:,.2f}"),
    ("e2e_p50_ms", "e2e p50 (ms)", "{:,.1f}"),
    ("e2e_p99_ms", "e2e p99 (ms)", "{:,.1f}"),
    ("output_tok_s", "output tokens/s", "{:,.1f}"),
    ("cache_hit_rate", "cache hit rate", "{:.1%}"),
    ("device_cache_hit_rate", "of which device", "{:.1%}"),
    ("host_cache_hit_rate", "of which host (onboarded)", "{:.1%}"),
    ("sessions", "sessions", "{:,}"),
    ("sessions_completed", "sessions completed", "{:,}"),
    ("session_time_p50_s", "session time p50 (s)", "{:,.2f}"),
    ("loadgen_cpu_util", "loadgen CPU (cores)", "{:.2f}"),
]


TURNS_SENT_NOTE = (
    "TTFT p50 / p90 leave out the requests still waiting for their first token when the run ended; "
    "the turns-sent rows count each at its wait so far (>= marks a figure such a wait could raise)."
)


def _cell(summary: dict[str, Any], key: str, fmt: str) -> str:
    value = summary.get(key)
    if value is None:
        return "-"
    return (">= " if key in summary.get("lower_bounds", ()) else "") + fmt.format(value)


def write_results(out: Path, results: Results) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_bytes(msgspec.json.format(msgspec.json.encode(results), indent=1))
    tmp.replace(path)  # a reader never sees half a file
    return path


def load_results(directory: Path) -> Results:
    path = directory / "results.json" if directory.is_dir() else directory
    try:
        return msgspec.json.decode(path.read_bytes(), type=Results)
    except FileNotFoundError as exc:
        raise ReportError(f"{path}: no results.json (not a loadgen --out directory?)") from exc
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ReportError(f"{path}: not a loadgen results file: {exc}") from exc


def _charts_md(out: Path) -> list[str]:
    return [f"![{name}]({file})" for name, file in CHARTS.items() if (out / file).exists()]


def write_report(out: Path, results: Results) -> list[Path]:
    """report.md and the charts of one run."""
    charts = write_charts([(out.name or "run", results.requests)], out)
    summary, config = results.summary, results.config
    lines = [f"# kvgate loadgen: {config.get('workload', '?')} against {config.get('url', '?')}", ""]
    lines += ["| metric | value |", "| --- | ---: |"]
    lines += [f"| {label} | {_cell(summary, key, fmt)} |" for key, label, fmt in SUMMARY_ROWS]
    if summary.get("unfinished_before_first_token"):
        lines += ["", TURNS_SENT_NOTE]
    if summary.get("error_statuses"):
        statuses = ", ".join(f"{k}: {v}" for k, v in summary["error_statuses"].items())
        lines += ["", f"Errors by status (0 = no HTTP response): {statuses}."]
        examples = {r.error for r in results.requests if r.error}
        lines += [f"- `{e}`" for e in sorted(examples)[:5]]
    if summary.get("interrupted"):
        lines += ["", "The run was interrupted; figures cover what was measured until then."]
    lines += ["", "## Configuration", "", "```", *(f"{k}: {v}" for k, v in config.items()), "```", ""]
    lines += ["## Charts", "", *_charts_md(out), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return [path, *charts]


def write_comparison(dirs: Sequence[Path], out: Path) -> list[Path]:
    """A side-by-side report.md and overlaid charts of several runs, the first being the baseline."""
    if len(dirs) < 2:
        raise ReportError("compare needs at least two run directories")
    runs = [(d.resolve().name or str(d), load_results(d)) for d in dirs]
    labels = [label for label, _ in runs]
    if len(set(labels)) < len(labels):
        labels = [str(d) for d in dirs]
    out.mkdir(parents=True, exist_ok=True)
    charts = write_charts([(label, r.requests) for label, (_, r) in zip(labels, runs, strict=True)], out)
    base = runs[0][1].summary
    lines = ["# kvgate loadgen: comparison", "", f"Baseline (ratios): `{labels[0]}`.", ""]
    lines += ["| metric | " + " | ".join(labels) + " |", "| --- |" + " ---: |" * len(labels)]
    for key, label, fmt in SUMMARY_ROWS:
        cells = []
        for _, results in runs:
            cell = _cell(results.summary, key, fmt)
            value, ref = results.summary.get(key), base.get(key)
            if (
                results.summary is not base
                and isinstance(value, int | float)
                and isinstance(ref, int | float)
                and ref
            ):
                cell += f" ({value / ref:.2f}x)"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Configurations", ""]
    for label, (_, results) in zip(labels, runs, strict=True):
        config = ", ".join(f"{k}={v}" for k, v in results.config.items())
        lines.append(f"- `{label}`: {config}")
    lines += ["", "## Charts", "", *_charts_md(out), ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return [path, *charts]
