"""Every policy on the same workload, in one run: the same arrivals, the same engines, the same seed."""

from __future__ import annotations

import gc
import multiprocessing
import os
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from functools import partial
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TypeVar, cast

from loadgen.sim.metrics import summarize
from loadgen.sim.oracle import oracle_figures
from loadgen.sim.report import SimReport
from loadgen.sim.simulation import SimConfig, SimRun, Simulation
from loadgen.sim.workload import Workload

T = TypeVar("T")

BASELINES = ("round_robin", "random", "least_loaded", "session_sticky", "kv_overlap", "cache_aware")
POLICIES = (*BASELINES, "session_kv")

# A replay allocates millions of short-lived objects and almost no cycles; at the default thresholds
# the collector's passes (the full ones over the hashed workload too) take ~5 % of it for nothing.
REPLAY_GC_THRESHOLD = (50_000, 20, 100)


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


@contextmanager
def replay_gc() -> Iterator[None]:
    """What exists before a replay (the workload) is left out of collections, which run less often.
    (Objects a caller froze itself stay frozen: then nothing is frozen or unfrozen here.)"""
    threshold = gc.get_threshold()
    freeze = gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    gc.set_threshold(*REPLAY_GC_THRESHOLD)
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        if freeze:
            gc.unfreeze()


def run_policy(workload: Workload, policy: str, config: SimConfig) -> tuple[SimRun, float]:
    started = time.perf_counter()
    with replay_gc():
        run = Simulation(workload, policy, config).run()
    return run, time.perf_counter() - started


def default_jobs(policies: int) -> int:
    """One process per policy, at most one per core this process may use."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(policies, cores or 1))


def _child(conn: Connection, workload: Workload, policy: str, config: SimConfig) -> None:
    """A forked process's whole life: one policy's replay, its result (or its error) sent back."""
    try:
        conn.send(("ok", run_policy(workload, policy, config)))
    except Exception:  # the parent reports it: a child must not die silently
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def _run_forked(
    workload: Workload,
    policies: Sequence[str],
    config: SimConfig,
    jobs: int,
    while_idle: Callable[[], T],
) -> tuple[dict[str, tuple[SimRun, float]], T]:
    """Up to `jobs` policies at a time (the last one as soon as the one before it starts), each in a
    forked child: the hashed workload (hundreds of MB of memoised block hashes on a big trace) is
    inherited through fork instead of pickled per task.
    `while_idle()` runs here once a core is left without a replay (the last ones are running); its
    result is returned with theirs."""
    ctx = multiprocessing.get_context("fork")
    pending = list(policies)
    running: dict[Connection, tuple[multiprocessing.process.BaseProcess, str]] = {}
    results: dict[str, tuple[SimRun, float]] = {}
    idle_result: list[T] = []
    try:
        while pending or running:
            if not idle_result and not pending and len(running) < jobs:
                idle_result.append(while_idle())
            # the last replay starts with the ones before it still running (one process more than
            # cores for a while) rather than alone after them, with every other core idle
            while pending and len(running) < jobs + (len(pending) == 1):
                policy = pending.pop(0)
                conn, child = _fork(ctx, workload, policy, config)
                running[conn] = (child, policy)
            for ready in wait(list(running)):
                conn = cast(Connection, ready)  # wait() returns what it was given: our connections
                child, policy = running.pop(conn)
                results[policy] = _result(conn, child, policy)
    finally:
        for conn, (proc, _policy) in running.items():  # an error above: end the others
            proc.terminate()
            proc.join()
            conn.close()
    return results, idle_result[0] if idle_result else while_idle()


def _fork(
    ctx: multiprocessing.context.ForkContext, workload: Workload, policy: str, config: SimConfig
) -> tuple[Connection, multiprocessing.process.BaseProcess]:
    """A child replaying `policy`, and the reading end of the pipe its result comes back on."""
    recv, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_child, args=(send, workload, policy, config), daemon=True)
    child.start()
    send.close()  # the child holds the only writer: EOF if it dies
    return recv, child


def _result(
    conn: Connection, child: multiprocessing.process.BaseProcess, policy: str
) -> tuple[SimRun, float]:
    """A finished child's run and seconds, the child joined; RuntimeError if it failed or died."""
    try:
        status, value = conn.recv()
    except EOFError:
        child.join()
        raise RuntimeError(f"policy {policy}: its process died (exit code {child.exitcode})") from None
    conn.close()
    child.join()
    if status != "ok":
        raise RuntimeError(f"policy {policy} failed:\n{value}")
    return value


def compare(
    trace_name: str | Path,
    workload: Workload,
    policies: Sequence[str],
    config: SimConfig,
    jobs: int | None = 1,
) -> tuple[SimReport, dict[str, SimRun], dict[str, float]]:
    """Replay the workload once per policy; returns the report, the raw runs and seconds per policy.
    `jobs`: policies run in parallel processes (None: `default_jobs`)."""
    if jobs is None:
        jobs = default_jobs(len(policies))
    oracle_of = partial(oracle_figures, workload, config.max_num_batched_tokens)
    runs: dict[str, SimRun] = {}
    runtime: dict[str, float] = {}
    if jobs > 1 and len(policies) > 1 and "fork" in multiprocessing.get_all_start_methods():
        # every row hashed before the fork (the children share the memo); the oracle's own pass waits
        # for a core the replays leave idle (seven replays on two cores: the last runs alone)
        workload.hash_all()
        results, oracle = _run_forked(workload, policies, config, jobs, while_idle=oracle_of)
        for policy in policies:  # in the caller's order, not the order they finished in
            runs[policy], runtime[policy] = results[policy]
    elif jobs > 1 and len(policies) > 1:
        oracle = oracle_of()
        with ProcessPoolExecutor(max_workers=min(jobs, len(policies))) as pool:
            # each process gets its own copy of the hashed workload (pickled once per task)
            futures = {p: pool.submit(run_policy, workload, p, config) for p in policies}
            for policy, future in futures.items():
                runs[policy], runtime[policy] = future.result()
    else:
        oracle = oracle_of()
        for policy in policies:
            runs[policy], runtime[policy] = run_policy(workload, policy, config)
    report = SimReport(
        trace=Path(trace_name).name,
        workers=config.workers,
        oracle_hit_rate=oracle.oracle_hit_rate,
        ideal_ttft_mean_ms=oracle.ideal_ttft_mean_ms,
        policies={
            p: summarize(
                runs[p].records, [runs[p].busy_s[w] for w in sorted(runs[p].busy_s)], config.host_blocks > 0
            )
            for p in policies
        },
    )
    return report, runs, runtime
