"""report.md's summary table: the turns-sent rows and their lower-bound marks."""

from __future__ import annotations

from pathlib import Path

from loadgen.metrics import RequestRecord, summarize
from loadgen.report import TURNS_SENT_NOTE, Results, write_report


def _served(i: int) -> RequestRecord:
    return RequestRecord("s", i, "x", float(i), i + 1.0, True, 200, ttft=0.1 * (i + 1), e2e=1.0)


def test_a_run_with_turns_still_waiting_marks_the_turns_sent_figures_a_wait_could_raise(
    tmp_path: Path,
) -> None:
    """Eight turns served and two still waiting at the end: the p90 over the turns sent reads a wait,
    so report.md marks it ">=", the p50 it leaves bare, and the note says what the rows count."""
    waiting = [RequestRecord("w", 0, "x", 60.0, 90.0 + i, False, 0, unfinished=True) for i in range(2)]
    requests = [*(_served(i) for i in range(8)), *waiting]
    summary = summarize(requests, [], [], 2, 92.0)
    write_report(tmp_path, Results(summary, {"workload": "agentic"}, requests, []))
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in (tmp_path / "report.md").read_text().splitlines()
        if line.startswith("| ")
    }
    assert rows["TTFT p50, turns sent (ms)"] == "550.0"
    assert rows["TTFT p90, turns sent (ms)"].startswith(">= ")
    assert rows["TTFT p90 (ms)"] == f"{summary['ttft_p90_ms']:,.1f}"  # the plain one, over the eight
    assert TURNS_SENT_NOTE in (tmp_path / "report.md").read_text()


def test_a_run_with_every_turn_served_has_no_marks_and_no_note(tmp_path: Path) -> None:
    requests = [_served(i) for i in range(8)]
    summary = summarize(requests, [], [], 1, 10.0)
    assert summary["lower_bounds"] == [] and summary["ttft_sent_p50_ms"] == summary["ttft_p50_ms"]
    write_report(tmp_path, Results(summary, {"workload": "agentic"}, requests, []))
    text = (tmp_path / "report.md").read_text()
    assert ">= " not in text and TURNS_SENT_NOTE not in text
