"""`kvgate bench live`: the same seeded loadgen workload against several live systems, in one table.

Each system is one of
- a kvgate routing policy (`--policies`): a fresh `kvgate up --engine mock` per run (NATS, workers and
  the gateway in one process group), so no run inherits another's cache;
- a command (`--command NAME=CMD`) that serves an OpenAI-compatible endpoint on `{port}`, started
  fresh per run the same way (e.g. a peer's serve script);
- a URL (`--url NAME=URL`) already serving, used as it is.

Every seed runs every system once, in an order rotated per seed (alternating, so a noisy machine's
slow minutes do not all land on one system); each run is `kvgate loadgen` with the same arguments and
seed. The table gives the mean over seeds of TTFT p50 / p90 / p99, the same p50 / p90 over the turns
sent (one still without a first token when the run ended counted at its wait: a closed loop sends a
system that leaves turns unserved fewer, earlier turns, which the plain percentiles then flatter; ">="
where a longer wait could raise the figure), cache hit rate, requests/s, the errors and the requests
left unfinished (still in flight after loadgen's drain: their TTFT counts when their first token
came), and the gateway's CPU per request where the gateway is kvgate's own process (CPU time of
the `kvgate up` process, which is the gateway; its workers and NATS are child processes, not
counted). A kvgate gateway's `/metrics` at the end of each run is kept in the run's folder
(`gateway_metrics.txt`).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from kvutil.child_process import spawn_tied
from kvutil.http_probe import get_json

# the comparison README.md and docs/ROUTING.md report: agentic sessions, 4 workers of 4,096 blocks
DEFAULT_LOADGEN_ARGS = (
    "--workload agentic --rate 1 --duration 90 --max-think-s 10 --max-context 48000"
    " --plain-tools --ignore-eos"
)
DEFAULT_WORKER_ARGS = "--num-blocks 4096 --block-size 16 --max-num-seqs 256 --max-num-batched-tokens 8192"
METRICS = ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "cache_hit_rate", "request_rate", "errors")


class System(msgspec.Struct, frozen=True):
    name: str
    kind: str  # "policy" | "command" | "url"
    target: str  # the policy name, the command (with {port}), or the URL


class RunResult(msgspec.Struct):
    system: str
    seed: int
    summary: dict[str, Any]  # loadgen's summary
    gateway_cpu_ms_per_request: float | None  # kvgate's own gateway only


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--policies",
        default="session_kv,kv_overlap,round_robin",
        help="kvgate policies, comma-separated, each a fresh `kvgate up --engine mock` (default %(default)s)",
    )
    parser.add_argument(
        "--command",
        action="append",
        default=[],
        metavar="NAME=CMD",
        help="a system started fresh per run by CMD, which serves on {port} (repeatable)",
    )
    parser.add_argument(
        "--url", action="append", default=[], metavar="NAME=URL", help="a running system (repeatable)"
    )
    parser.add_argument(
        "--seeds", default="1,2,3", help="loadgen seeds, comma-separated (default %(default)s)"
    )
    parser.add_argument(
        "--workers", type=int, default=4, help="mock workers per kvgate (default %(default)s)"
    )
    parser.add_argument(
        "--worker-args", default=DEFAULT_WORKER_ARGS, help="for every mock worker (default %(default)r)"
    )
    parser.add_argument("--up-args", default="", help="more `kvgate up` arguments, one string")
    parser.add_argument(
        "--loadgen-args",
        default=DEFAULT_LOADGEN_ARGS,
        help="`kvgate loadgen` arguments (default %(default)r)",
    )
    parser.add_argument(
        "--port", type=int, default=8300, help="port each started system serves on (default %(default)s)"
    )
    parser.add_argument("--ready-timeout", type=float, default=180.0, help="seconds for a system to come up")
    parser.add_argument("--out", help="folder for each run's loadgen output and all results (results.json)")


def parse_systems(args: argparse.Namespace) -> list[System]:
    systems = [System(p, "policy", p) for p in args.policies.split(",") if p.strip()]
    for kind, specs in (("command", args.command), ("url", args.url)):
        for spec in specs:
            name, sep, target = spec.partition("=")
            if not sep or not name or not target:
                raise ValueError(f"--{kind} wants NAME=VALUE, got {spec!r}")
            systems.append(System(name, kind, target))
    names = [s.name for s in systems]
    if len(set(names)) != len(names):
        raise ValueError(f"system names must differ: {names}")
    if not systems:
        raise ValueError("nothing to measure: give --policies, --command or --url")
    return systems


def run_order(systems: list[System], round_index: int) -> list[System]:
    """Every round runs every system, rotated by one per round."""
    shift = round_index % len(systems)
    return systems[shift:] + systems[:shift]


# --- processes


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None, workers: int | None, timeout_s: float) -> None:
    """Until `url` serves a model (and, for kvgate, its gateway sees `workers` workers)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the system exited with {proc.returncode} before it was ready")
        if workers is not None:
            status, body = get_json(url + "/ready", 5.0)
            ready = status == 200 and isinstance(body, dict) and body.get("workers", 0) >= workers
        else:
            status, body = get_json(url + "/v1/models", 5.0)
            ready = status == 200 and isinstance(body, dict) and bool(body.get("data"))
        if ready:
            return
        time.sleep(0.5)
    raise TimeoutError(f"{url} was not ready within {timeout_s:.0f} s")


def stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL what is left after 20 s."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # children that outlived their parent


def stop_all(procs: Sequence[subprocess.Popen[bytes]], timeout_s: float = 10.0) -> None:
    """SIGTERM each, then wait for each; SIGKILL one still running after `timeout_s`."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of one process (Linux /proc), None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def save_metrics(url: str, path: Path, timeout_s: float = 10.0) -> None:
    """The gateway's Prometheus text at the run's end (its holds, moves, retries, split turns), for
    reading a run after the table; nothing is written where the gateway does not answer."""
    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=timeout_s) as resp:
            path.write_bytes(resp.read())
    except (OSError, http.client.HTTPException) as exc:
        print(f"  (no gateway metrics from {url}: {exc})", file=sys.stderr)


def start_system(system: System, args: argparse.Namespace, log: Path) -> subprocess.Popen[bytes] | None:
    if system.kind == "url":
        return None
    if system.kind == "policy":
        argv = [sys.executable, "-m", "gateway.cli", "up", "--engine", "mock", "--workers", str(args.workers)]
        argv += ["--port", str(args.port), "--policy", system.target, "--worker-args", args.worker_args]
        argv += ["--log-level", "WARNING", *shlex.split(args.up_args)]
    else:
        argv = ["bash", "-c", system.target.replace("{port}", str(args.port))]
    with log.open("wb") as out:
        return spawn_tied(argv, stdout=out, stderr=subprocess.STDOUT)


def run_loadgen(url: str, seed: int, loadgen_args: str, out: Path) -> dict[str, Any]:
    argv = [sys.executable, "-m", "gateway.cli", "loadgen", "--url", url, "--seed", str(seed)]
    argv += ["--out", str(out), "--no-progress", *shlex.split(loadgen_args)]
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, check=False)
    results = out / "results.json"
    if done.returncode != 0 or not results.exists():
        error = done.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"loadgen failed ({done.returncode}): {error}")
    summary: dict[str, Any] = json.loads(results.read_text())["summary"]
    return summary


def measure(system: System, seed: int, args: argparse.Namespace, folder: Path) -> RunResult:
    run_dir = folder / f"{system.name}-seed{seed}"
    run_dir.mkdir(parents=True, exist_ok=True)
    proc = start_system(system, args, run_dir / "system.log")
    url = system.target if system.kind == "url" else f"http://127.0.0.1:{args.port}"
    try:
        workers = args.workers if system.kind == "policy" else None
        wait_ready(url.rstrip("/").removesuffix("/v1"), proc, workers, args.ready_timeout)
        cpu_before = cpu_seconds(proc.pid) if system.kind == "policy" and proc is not None else None
        summary = run_loadgen(url, seed, args.loadgen_args, run_dir / "loadgen")
        cpu_after = cpu_seconds(proc.pid) if cpu_before is not None and proc is not None else None
        if system.kind == "policy":
            save_metrics(url, run_dir / "gateway_metrics.txt")
    finally:
        if proc is not None:
            stop_group(proc)
    per_request = None
    if cpu_before is not None and cpu_after is not None and summary.get("requests"):
        per_request = (cpu_after - cpu_before) * 1e3 / summary["requests"]
    return RunResult(system.name, seed, summary, per_request)


# --- the table


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _sent(runs: list[RunResult]) -> str:
    """TTFT p50 / p90 over the turns sent, the mean over seeds of each, marked ">=" where a seed's is
    a lower bound."""
    cells = []
    for key in ("ttft_sent_p50_ms", "ttft_sent_p90_ms"):
        bound = any(key in r.summary.get("lower_bounds", ()) for r in runs)
        mean = _mean([float(r.summary.get(key) or 0.0) for r in runs])
        cells.append((">= " if bound else "") + f"{mean:,.0f}")
    return " / ".join(cells)


def table(systems: list[System], results: list[RunResult]) -> str:
    header = (
        "| system | runs | TTFT p50 / p90 / p99 ms | TTFT p50 / p90 ms, turns sent | hit rate | requests/s |"
        " errors | unfinished | gateway CPU ms/req |\n"
        "|---|---:|---|---|---:|---:|---:|---:|---:|"
    )
    rows = [header]
    for system in systems:
        runs = [r for r in results if r.system == system.name]
        if not runs:
            continue
        mean = {m: _mean([float(r.summary.get(m, 0.0)) for r in runs]) for m in METRICS}
        cpu = [r.gateway_cpu_ms_per_request for r in runs if r.gateway_cpu_ms_per_request is not None]
        cpu_text = f"{_mean(cpu):.2f}" if cpu else "-"
        rows.append(
            f"| {system.name} | {len(runs)} | {mean['ttft_p50_ms']:,.0f} / {mean['ttft_p90_ms']:,.0f} / "
            f"{mean['ttft_p99_ms']:,.0f} | {_sent(runs)} | "
            f"{mean['cache_hit_rate']:.3f} | {mean['request_rate']:.2f} | "
            f"{sum(int(r.summary.get('errors', 0)) for r in runs)} | "
            f"{sum(int(r.summary.get('unfinished', 0)) for r in runs)} | {cpu_text} |"
        )
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    try:
        systems = parse_systems(args)
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError as exc:
        print(f"kvgate bench live: {exc}")
        return 2
    folder = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="kvgate-bench-live-"))
    results: list[RunResult] = []
    for index, seed in enumerate(seeds):
        for system in run_order(systems, index):
            print(f"seed {seed}: {system.name} ...", flush=True)
            try:
                result = measure(system, seed, args, folder)
            except (RuntimeError, TimeoutError) as exc:
                print(f"kvgate bench live: {system.name}, seed {seed}: {exc}")
                return 1
            results.append(result)
            s = result.summary
            print(
                f"  TTFT p50 {s['ttft_p50_ms']:,.0f} p90 {s['ttft_p90_ms']:,.0f} ms "
                f"(turns sent {_sent([result])}), "
                f"hit {s['cache_hit_rate']:.3f}, errors {s['errors']}, unfinished {s.get('unfinished', 0)}",
                flush=True,
            )
    (folder / "results.json").write_bytes(msgspec.json.encode(results))
    print(f"\nloadgen {args.loadgen_args}; seeds {args.seeds}; results in {folder}\n")
    print(table(systems, results))
    return 0
