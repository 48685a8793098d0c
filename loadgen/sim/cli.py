"""`kvgate sim`: replay a trace against simulated workers, every policy on the same arrivals."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import msgspec

from engines.mock import DEFAULT_HOST_BANDWIDTH_GBPS
from engines.onboarding import add_onboarding_arguments
from loadgen.sim.compare import compare, parse_policies
from loadgen.sim.report import render_table, write_charts
from loadgen.sim.simulation import SimConfig, SimRun
from loadgen.sim.sweep import parse_multiples, sweep_host_tier, sweep_markdown, write_sweep_chart
from loadgen.sim.synthetic import WORKLOADS, mixed_rows, parse_mix
from loadgen.sim.turns_out import write_turns
from loadgen.sim.workload import Workload
from loadgen.trace import TRACE_BLOCK_SIZE, TraceError, TraceRow, load_trace


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _positive_floats(text: str) -> list[float]:
    return [_positive_float(part) for part in text.split(",")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", type=Path, help="JSONL trace (traces/README.md format)")
    source.add_argument(
        "--workload",
        metavar="|".join(WORKLOADS),
        help="a load generator workload instead of a trace (its defaults); several joined by + are played "
        "together, rows merged by arrival (e.g. prefix+chat: one-shot traffic beside sessions)",
    )
    parser.add_argument(
        "--rate",
        type=_positive_floats,
        default=[1.0],
        help="--workload: sessions per second; R,R,... for a mix, one per workload in its order",
    )
    parser.add_argument("--duration", type=_positive_float, default=300.0, help="--workload: arrivals (s)")
    parser.add_argument(
        "--max-context", type=_positive_int, default=None, help="--workload: sessions end before this size"
    )
    _add_pool_arguments(parser)
    _add_sweep_arguments(parser)
    _add_replay_arguments(parser)
    _add_engine_and_router_arguments(parser)
    parser.add_argument(
        "--jobs",
        type=_positive_int,
        default=None,
        help="policies run in parallel processes (default: one per policy, at most one per core)",
    )
    parser.add_argument(
        "--json", metavar="OUT", default=None, help="write the result object to OUT (- = stdout)"
    )
    parser.add_argument("--charts", metavar="DIR", default=None, help="write PNG charts into DIR")
    parser.add_argument(
        "--turns",
        metavar="FILE",
        default=None,
        help="write every turn of every policy to FILE, a JSON line each (its worker, when it was sent, "
        "its first token, its cached tokens: where its TTFT went)",
    )


def _add_pool_arguments(parser: argparse.ArgumentParser) -> None:
    """The simulated workers and the policies compared over them."""
    parser.add_argument("--workers", type=_positive_int, default=8, help="simulated workers")
    parser.add_argument("--policy", default="all", help="all, or a comma-separated list of policies")
    parser.add_argument("--num-blocks", type=_positive_int, default=16_384, help="KV blocks per worker")
    parser.add_argument("--block-size", type=_positive_int, default=64, help="tokens per KV block")
    parser.add_argument(
        "--host-blocks",
        type=_non_negative_int,
        default=0,
        help="each worker's host-memory KV tier, in blocks (0: none; 4x --num-blocks is typical)",
    )
    parser.add_argument(
        "--host-bandwidth",
        type=_positive_float,
        default=DEFAULT_HOST_BANDWIDTH_GBPS,
        help="host link GB/s for onboarding copies (default: PCIe Gen5 x16, effective)",
    )


def _add_sweep_arguments(parser: argparse.ArgumentParser) -> None:
    """A sweep of the host tier's size."""
    parser.add_argument(
        "--host-multiples",
        metavar="M,M,...",
        default=None,
        help="sweep the host tier: every policy at each size, M x --num-blocks per worker (e.g. "
        "0,1,2,4,8); --json then writes the sweep's table, --sweep-chart its chart",
    )
    parser.add_argument(
        "--sweep-chart", metavar="PNG", default=None, help="with --host-multiples: TTFT against host size"
    )


def _add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    """How the rows are replayed: their blocks, time, seeds and the bus's delay."""
    parser.add_argument(
        "--trace-block-size", type=_positive_int, default=TRACE_BLOCK_SIZE, help="tokens per trace hash id"
    )
    parser.add_argument("--max-think-s", type=float, default=60.0, help="cap on a session's think time")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the generated workload, trace content, policies' draws"
    )
    parser.add_argument(
        "--policy-seed",
        type=int,
        default=None,
        help="seed of the policies' random choices alone (default: --seed): the same traffic, other draws",
    )
    parser.add_argument("--limit", type=_positive_int, default=None, help="replay only the first N rows")
    parser.add_argument(
        "--rate-scale",
        type=_positive_float,
        default=1.0,
        help="divide timestamps and think times by X (X > 1 compresses time)",
    )
    parser.add_argument("--bus-delay-ms", type=float, default=5.0, help="KV events, load reports, pins")


def _add_engine_and_router_arguments(parser: argparse.ArgumentParser) -> None:
    """The engine's scheduling rules and the router's settings, the same for every policy."""
    parser.add_argument(
        "--admission",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="session_kv holds sessions under memory pressure (router/admission.py); default: the "
        "router's (off)",
    )
    parser.add_argument(
        "--pin-baselines",
        action="store_true",
        help="give the baselines the gateway's pin hints too (the 'same engine' ablation; default: "
        "only session_kv pins, as none of the systems the baselines are named after does)",
    )
    parser.add_argument(
        "--no-session-ids",
        dest="session_ids",
        action="store_false",
        help="the router sees no session ids, tool-result marks or parents, as from a client that sends "
        "none (`kvgate loadgen --no-session-header`): it infers the sessions from the prompts",
    )
    parser.add_argument(
        "--preempt-for-prompts",
        action="store_true",
        help="every worker's engine lets a prompt that does not fit preempt decoding requests "
        "(engines/scheduler.py; the same engine for every policy)",
    )
    parser.add_argument(
        "--priority-scheduling",
        action="store_true",
        help="every worker's engine orders its queue by request priority and lets a request preempt "
        "running ones it outranks, as SGLang's --enable-priority-scheduling (engines/scheduler.py; the "
        "same engine for every policy; only session_kv sends priorities)",
    )
    add_onboarding_arguments(parser, "every worker's engine")
    parser.add_argument(
        "--set",
        dest="router_settings",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a RouterConfig field for every policy (repeatable), e.g. --set stall_factor=1.5",
    )


def _router_settings(pairs: list[str]) -> dict[str, object]:
    """`NAME=VALUE` pairs as RouterConfig fields (values read as JSON, else kept as text); checked."""
    from router.config import RouterConfig

    settings: dict[str, object] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in RouterConfig.__struct_fields__:
            raise ValueError(f"--set {pair!r}: expected NAME=VALUE with NAME a RouterConfig field")
        try:
            settings[name] = msgspec.json.decode(value)
        except msgspec.DecodeError:
            settings[name] = value
    try:
        msgspec.convert(settings, RouterConfig, strict=False)
    except (msgspec.ValidationError, ValueError) as exc:
        raise ValueError(f"--set: {exc}") from None
    return settings


def _sweep(
    args: argparse.Namespace,
    name: str | Path,
    workload: Workload,
    policies: list[str],
    config: SimConfig,
    multiples: list[float],
    started: float,
) -> int:
    sweep = sweep_host_tier(name, workload, policies, config, multiples, jobs=args.jobs)
    to_stdout = args.json == "-"
    if not to_stdout:
        print(sweep_markdown(sweep))
        elapsed = time.perf_counter() - started
        sizes = len(multiples)
        print(f"{len(workload)} rows x {len(policies)} policies x {sizes} host sizes in {elapsed:.1f} s")
    if args.json is not None:
        write_json(args.json, sweep)
    if args.sweep_chart is not None:
        path = write_sweep_chart(sweep, args.sweep_chart)
        if not to_stdout:
            print(f"wrote {path}")
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        policies = parse_policies(args.policy)
        settings, multiples = _checked_settings(args)
        rows = _rows(args)
    except (OSError, TraceError, ValueError) as exc:
        print(f"kvgate sim: {exc}", file=sys.stderr)
        return 2
    config = _sim_config(args, settings)
    workload = Workload(
        rows,
        block_size=args.block_size,
        trace_block_size=args.trace_block_size,
        max_think_s=args.max_think_s,
        rate_scale=args.rate_scale,
        seed=args.seed,
    )
    started = time.perf_counter()
    name = args.trace if args.trace is not None else f"workload:{args.workload}"
    if multiples is not None:
        return _sweep(args, name, workload, policies, config, multiples, started)
    report, runs, runtime = compare(name, workload, policies, config, jobs=args.jobs)
    elapsed = time.perf_counter() - started
    to_stdout = args.json == "-"
    if not to_stdout:
        render_table(report, runtime)
        print(f"{len(rows)} rows x {len(policies)} policies in {elapsed:.1f} s")
        _print_holds(runs)
    if args.json is not None:
        write_json(args.json, report)
    if args.charts:
        for path in write_charts(report, runs, args.charts):
            if not to_stdout:
                print(f"wrote {path}")
    if args.turns is not None:
        written = write_turns(args.turns, {policy: run.records for policy, run in runs.items()})
        if not to_stdout:
            print(f"wrote {written} turns to {args.turns}")
    return 0


def _checked_settings(args: argparse.Namespace) -> tuple[dict[str, object], list[float] | None]:
    """The `--set` router settings and the `--host-multiples` sweep, once every setting that cannot
    be combined or is out of range has raised ValueError."""
    if args.trace_block_size % args.block_size:
        raise ValueError("--trace-block-size must be a multiple of --block-size")
    if args.max_think_s < 0 or args.bus_delay_ms < 0:
        raise ValueError("--max-think-s and --bus-delay-ms must not be negative")
    settings = _router_settings(args.router_settings)
    multiples = parse_multiples(args.host_multiples) if args.host_multiples is not None else None
    if args.sweep_chart is not None and multiples is None:
        raise ValueError("--sweep-chart needs --host-multiples")
    if args.turns is not None and multiples is not None:
        raise ValueError("--turns writes one replay per policy: not with --host-multiples")
    if args.priority_scheduling and args.preempt_for_prompts:
        raise ValueError("--priority-scheduling and --preempt-for-prompts are two engines: choose one")
    return settings, multiples


def _rows(args: argparse.Namespace) -> list[TraceRow]:
    """The trace's rows, or the generated workload's (whose hash ids are blocks of the simulated size)."""
    if args.workload is not None:
        args.trace_block_size = args.block_size
        mix = parse_mix(args.workload, args.rate)
        rows = mixed_rows(mix, args.duration, args.block_size, args.seed, args.max_context)[: args.limit]
    else:
        rows = load_trace(args.trace, args.limit)
    if not rows:
        raise ValueError(f"{args.trace or args.workload}: no rows")
    return rows


def _sim_config(args: argparse.Namespace, settings: dict[str, object]) -> SimConfig:
    return SimConfig(
        workers=args.workers,
        num_blocks=args.num_blocks,
        block_size=args.block_size,
        bus_delay_s=args.bus_delay_ms / 1000.0,
        seed=args.seed if args.policy_seed is None else args.policy_seed,
        session_admission=args.admission,
        host_blocks=args.host_blocks,
        host_bandwidth_gbps=args.host_bandwidth,
        pin_baselines=args.pin_baselines,
        session_ids=args.session_ids,
        preempt_for_prompts=args.preempt_for_prompts,
        priority_scheduling=args.priority_scheduling,
        onboarding=args.onboarding,
        router_settings=settings,
    )


def _print_holds(runs: dict[str, SimRun]) -> None:
    """The turns each policy's admission, router queue or KV room held before routing, where any were."""
    for policy, sim_run in runs.items():
        if sim_run.held:
            print(f"{policy}: {sim_run.held} turns held before routing (admission or a router queue)")
        if sim_run.room_held:
            print(
                f"{policy}: {sim_run.room_held} turns held at the router for KV room "
                f"({sim_run.room_overdue} sent by the bound, {sim_run.room_hold_s:.0f} s in all)"
            )


def write_json(target: str, value: object) -> None:
    """`--json`: to the file named, or to stdout for "-"."""
    data = msgspec.json.encode(value)
    if target == "-":
        sys.stdout.write(data.decode() + "\n")
    else:
        Path(target).write_bytes(data + b"\n")
