"""Every policy on the same workload, in one run: the same arrivals, the same engines, the same seed."""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from loadgen.sim.metrics import summarize
from loadgen.sim.oracle import oracle_figures
from loadgen.sim.report import SimReport
from loadgen.sim.simulation import SimConfig, SimRun, Simulation
from loadgen.sim.workload import Workload

BASELINES = ("round_robin", "random", "least_loaded", "session_sticky", "kv_overlap", "cache_aware")
POLICIES = (*BASELINES, "session_kv")


def parse_policies(spec: str) -> list[str]:
    if spec.strip() == "all":
        return list(POLICIES)
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in POLICIES]
    if unknown or not names:
        raise ValueError(
            f"unknown policy {', '.join(unknown) or spec!r}; choose from all, {', '.join(POLICIES)}"
        )
    return list(dict.fromkeys(names))


def run_policy(workload: Workload, policy: str, config: SimConfig) -> tuple[SimRun, float]:
    started = time.perf_counter()
    run = Simulation(workload, policy, config).run()
    return run, time.perf_counter() - started


def compare(
    trace_name: str | Path,
    workload: Workload,
    policies: Sequence[str],
    config: SimConfig,
    jobs: int = 1,
) -> tuple[SimReport, dict[str, SimRun], dict[str, float]]:
    """Replay the workload once per policy; returns the report, the raw runs and seconds per policy."""
    oracle = oracle_figures(workload, config.max_num_batched_tokens)  # also warms the hash memo
    runs: dict[str, SimRun] = {}
    runtime: dict[str, float] = {}
    if jobs > 1 and len(policies) > 1:
        with ProcessPoolExecutor(max_workers=min(jobs, len(policies))) as pool:
            # each process gets its own copy of the hashed workload (pickled once per task)
            futures = {p: pool.submit(run_policy, workload, p, config) for p in policies}
            for policy, future in futures.items():
                runs[policy], runtime[policy] = future.result()
    else:
        for policy in policies:
            runs[policy], runtime[policy] = run_policy(workload, policy, config)
    report = SimReport(
        trace=Path(trace_name).name,
        workers=config.workers,
        oracle_hit_rate=oracle.oracle_hit_rate,
        ideal_ttft_mean_ms=oracle.ideal_ttft_mean_ms,
        policies={
            p: summarize(runs[p].records, [runs[p].busy_s[w] for w in sorted(runs[p].busy_s)])
            for p in policies
        },
    )
    return report, runs, runtime
