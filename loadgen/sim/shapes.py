"""Traffic shapes `kvgate sim` has no option for, replayed on the live comparison's pool.

`python -m loadgen.sim.shapes grid [--set NAME=VALUE ...] [--policy-seeds 0,1,2]` prints, per row,
`session_kv`'s mean TTFT against the better of `kv_overlap` and `cache_aware` (the rows of
docs/EXPERIMENTS.md, idea 16, that the memory wait concerns); over several draws of the policies, the
mean of each side's means and the ratio per draw. `python -m loadgen.sim.shapes live [--seeds 1,2,3]
[--rate R] [--policy P,...] [--workers N] [--num-blocks B] [--max-think-s T] [--no-session-header]
[--agentic NAME=VALUE ...]` prints each policy's (`session_kv` by default) TTFT p50 / p90 / mean over
the live run's window. Pool: 4 workers x 4,096 blocks of 16 tokens, think times capped at 10 s (`live`
takes others). `--set` settings are `session_kv`'s, `--baseline-set` ones the baselines' (both kinds
RouterConfig fields), e.g. `--policy kv_overlap --baseline-set kv_affinity_ttl_s=60` for Dynamo with
its session affinity.

- `agentic` / `chat`: `kvgate sim --workload ...` rows (`agentic --duration 90 --max-think-s 10
  --max-context 48000`, `chat --duration 120 --max-think-s 10`).
- Sub-agents: for half the `agentic` sessions with more than `fork` turns, a child `<parent>/sub1`
  (the parent header, as the Claude Code traces name children) whose first prompt is the parent's
  turn-`fork` prompt (all its blocks, or the first half) plus a 256-token task, and whose later turns
  grow as the next session's do, cut at 48,000 tokens; it starts 3 s after its parent would have sent
  that turn (2 s a turn plus the think times).
- `prefix` 10/s (one-shot) merged with `agentic` 0.1 sessions/s.
- The live window: `kvgate loadgen --workload agentic --rate 1 (or R) --duration 90 --max-think-s 10
  --max-context 48000 --plain-tools --ignore-eos --eos-after 1` as the simulator plays it: each reply one
  character (its decode still `max_tokens` tokens), the turns that arrive before 90 s and have a first
  token by 120 s counted, as live (docs/EXPERIMENTS.md, "Live, fourth pass"). `--no-session-header`
  as loadgen's: the router sees no session ids or tool marks and infers each session from its prompts.
  `--agentic NAME=VALUE` sets a field of the workload's `AgenticConfig`, as loadgen's flags do
  (`agent_types=16` for `--agent-types 16`, `tool_result_tokens=lognormal:2000,1.2,max=22000`).
"""

from __future__ import annotations

import argparse
import math
import random
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import msgspec
import numpy as np

from loadgen import workloads
from loadgen.distributions import Distribution, parse_distribution
from loadgen.sim.compare import run_policy
from loadgen.sim.simulation import SimConfig, SimRun
from loadgen.sim.synthetic import make_workload, workload_rows
from loadgen.sim.workload import Workload
from loadgen.trace import TraceRow

BLOCK_SIZE = 16
BASELINES = ("kv_overlap", "cache_aware")
MAX_CONTEXT = 48_000
TASK_BLOCKS = 16  # a sub-agent's task after the prefix it shares with its parent


def cli_rows(name: str, rate: float, duration_s: float, max_context: int | None) -> list[TraceRow]:
    """The rows `kvgate sim --workload NAME --rate RATE --duration D --max-context M` replays."""
    return workload_rows(make_workload(name, rate, 0, max_context), duration_s, BLOCK_SIZE, 0)


def live_rows(seed: int, rate: float = 1.0, shape: dict[str, object] | None = None) -> list[TraceRow]:
    """The live agentic run's turns (`rate` sessions/s, 90 s) with one-character replies, as
    `--eos-after 1`; `shape`: other `AgenticConfig` fields (`agentic_shape`)."""
    config = workloads.AgenticConfig(plain_tools=True, max_context_tokens=MAX_CONTEXT)
    config = msgspec.structs.replace(config, **(shape or {}))
    workload = workloads.AgenticWorkload(config, rate, seed)
    return workload_rows(workload, 90, BLOCK_SIZE, seed, reply_tokens=1)


def sub_agent_rows(rate: float, fork: int, half: bool) -> list[TraceRow]:
    """`agentic` rows plus sub-agents forked at the parent's turn `fork` (the module's docstring)."""
    rows = cli_rows("agentic", rate, 90, MAX_CONTEXT)
    sessions: dict[str, list[TraceRow]] = {}
    for row in rows:
        sessions.setdefault(row.session_id or "", []).append(row)
    keys = list(sessions)
    rng = random.Random(1000)
    fresh = iter(range(1 << 40, 1 << 41))  # hash ids no prompt of the workload has
    children: list[TraceRow] = []
    for i, key in enumerate(keys):
        turns = sessions[key]
        if len(turns) <= max(1, fork) or rng.random() >= 0.5:
            continue
        base = turns[fork].hash_ids
        ids = base[: len(base) // 2] if half else list(base)
        ids += [next(fresh) for _ in range(TASK_BLOCKS)]
        start = turns[0].timestamp + sum(min(t.delay_ms, 10_000) + 2_000 for t in turns[1 : fork + 1]) + 3_000
        donor = sessions[keys[(i + 1) % len(keys)]]
        for n, like in enumerate(donor):
            if n:
                grown = max(1, (like.input_length - donor[n - 1].input_length) // BLOCK_SIZE)
                if (len(ids) + grown) * BLOCK_SIZE > MAX_CONTEXT:
                    break
                ids += [next(fresh) for _ in range(grown)]
            children.append(
                TraceRow(
                    timestamp=start,
                    input_length=len(ids) * BLOCK_SIZE + 5,
                    output_length=like.output_length,
                    hash_ids=list(ids),
                    session_id=f"{key}/sub1",
                    turn=n,
                    delay_ms=like.delay_ms if n else 0.0,
                    stop="tool_use",
                )
            )
        children[-1] = msgspec.structs.replace(children[-1], stop="end_turn")
    return sorted(rows + children, key=lambda r: (r.timestamp, r.session_id or "", r.turn))


def mixed_rows() -> list[TraceRow]:
    """`prefix` 10 requests/s (no session ids) with `agentic` 0.1 sessions/s, by arrival."""
    one_shot = workload_rows(make_workload("prefix", 10, 0, None), 120, BLOCK_SIZE, 0)
    return sorted(one_shot + cli_rows("agentic", 0.1, 90, MAX_CONTEXT), key=lambda r: r.timestamp)


GRID: dict[str, Callable[[], list[TraceRow]]] = {
    **{f"agentic {r}": partial(cli_rows, "agentic", r, 90, MAX_CONTEXT) for r in (0.1, 0.15, 0.2, 0.3)},
    **{f"chat {r}": partial(cli_rows, "chat", r, 120, None) for r in (1, 2, 4)},
    **{
        f"sub-agents {shape} {r}": partial(sub_agent_rows, r, fork, half)
        for r in (0.1, 0.3)
        for shape, fork, half in (("turn 1", 1, False), ("half", 1, True), ("turn 3", 3, False))
    },
    "prefix 10 + agentic 0.1": mixed_rows,
}


class Pool(NamedTuple):
    """The replay's pool and think cap: the live comparison's unless `live` is told otherwise."""

    workers: int = 4
    num_blocks: int = 4096
    max_think_s: float = 10.0


def replay(
    rows: list[TraceRow],
    policy: str,
    settings: dict[str, object],
    seed: int = 0,
    pool: Pool | None = None,
    session_ids: bool = True,
) -> SimRun:
    pool = pool or Pool()
    config = SimConfig(
        workers=pool.workers,
        num_blocks=pool.num_blocks,
        block_size=BLOCK_SIZE,
        seed=seed,
        session_ids=session_ids,
        router_settings=settings,
    )
    workload = Workload(
        rows, block_size=BLOCK_SIZE, trace_block_size=BLOCK_SIZE, max_think_s=pool.max_think_s
    )
    return run_policy(workload, policy, config)[0]


def mean_ttft_ms(run: SimRun) -> float:
    return 1000.0 * float(np.mean([r.first_token - r.arrival for r in run.records if r.ok]))


class LiveWindow(NamedTuple):
    """TTFT over the live run's window (ms): of the turns that arrived before 90 s and had a first
    token by 120 s, and how many arrived before 90 s without one."""

    p50: float
    p90: float
    mean: float
    late: int
    # over every turn of the window, the late ones counted as the slowest: a policy cannot lower it by
    # starving a few turns past the window
    p90_every: float


def live_window(run: SimRun) -> LiveWindow:
    ttft: list[float] = []
    late = 0
    for r in run.records:
        if r.arrival >= 90.0:
            continue
        if r.ok and 0.0 <= r.first_token <= 120.0:
            ttft.append(1000.0 * (r.first_token - r.arrival))
        else:
            late += 1
    p50, p90 = np.percentile(ttft, [50, 90])
    # a measured turn or a late one, never a mix: no interpolation (with them, an infinite one)
    p90_every = np.percentile(ttft + [math.inf] * late, 90, method="inverted_cdf")
    return LiveWindow(float(p50), float(p90), float(np.mean(ttft)), late, float(p90_every))


def agentic_shape(pairs: list[str]) -> dict[str, object]:
    """`NAME=VALUE` fields of `AgenticConfig` (`agent_types=16`, `tool_result_tokens=lognormal:2000,1.2`):
    a distribution as loadgen's flags write it, a number as JSON."""
    fields = {f.name: f.type for f in msgspec.structs.fields(workloads.AgenticConfig)}
    shape: dict[str, object] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in fields:
            raise SystemExit(f"--agentic: no AgenticConfig field {name!r} (fields: {', '.join(fields)})")
        if fields[name] is Distribution:
            shape[name] = parse_distribution(value)
        else:
            shape[name] = msgspec.convert(msgspec.json.decode(value), fields[name])
    return shape


def parse_settings(pairs: list[str]) -> dict[str, object]:
    """`NAME=VALUE` router settings (values read as JSON, else kept as text), as `kvgate sim --set`."""
    settings: dict[str, object] = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            settings[name] = msgspec.json.decode(value)
        except msgspec.DecodeError:
            settings[name] = value
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m loadgen.sim.shapes", description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=("grid", "live"))
    parser.add_argument(
        "--set", dest="settings", action="append", default=[], metavar="NAME=VALUE", help="session_kv's"
    )
    parser.add_argument(
        "--baseline-set",
        dest="baseline_settings",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="the baselines' (e.g. kv_overlap as Dynamo at its best: kv_affinity_ttl_s=60)",
    )
    parser.add_argument("--rows", default="", help="grid: only the rows whose names start so (comma list)")
    parser.add_argument("--seeds", default="1,2,3", help="live: the loadgen seeds")
    parser.add_argument("--rate", type=float, default=1.0, help="live: sessions per second (the goal's 1)")
    parser.add_argument("--policy", default="session_kv", help="live: the policies (comma list)")
    options = parser.add_argument_group("live: the pool and think cap (default: the live comparison's)")
    options.add_argument("--workers", type=int, default=Pool().workers)
    options.add_argument("--num-blocks", type=int, default=Pool().num_blocks, help="of 16 tokens, per worker")
    options.add_argument("--max-think-s", type=float, default=Pool().max_think_s, help="as loadgen's")
    options.add_argument(
        "--agentic",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an AgenticConfig field, e.g. agent_types=16 (loadgen's --agent-types 16)",
    )
    options.add_argument(
        "--no-session-header",
        dest="session_ids",
        action="store_false",
        help="as loadgen's: the router sees no session ids or tool marks and infers the sessions",
    )
    parser.add_argument(
        "--policy-seeds",
        default="0",
        help="grid: the policies' draws (ties, sampling; the same traffic): each, and the mean over them",
    )
    args = parser.parse_args()
    settings = parse_settings(args.settings)
    baseline_settings = parse_settings(args.baseline_settings)
    if args.what == "live":
        pool = Pool(args.workers, args.num_blocks, args.max_think_s)
        shape = agentic_shape(args.agentic)
        for seed in (int(s) for s in args.seeds.split(",")):
            rows = live_rows(seed, args.rate, shape)
            for policy in args.policy.split(","):
                # `--set` is session_kv's experiments, `--baseline-set` the baselines' (as shipped without)
                chosen = settings if policy == "session_kv" else baseline_settings
                run = replay(rows, policy, chosen, seed, pool, args.session_ids)
                window = live_window(run)
                figures = f"{window.p50:,.0f} / {window.p90:,.0f} / {window.mean:,.0f} ms"
                print(
                    f"seed {seed} {policy}: TTFT p50 / p90 / mean {figures} ({window.late} without a "
                    f"first token by 120 s; p90 counting them as the slowest {window.p90_every:,.0f} ms)"
                )
        return
    wanted = [w for w in args.rows.split(",") if w]
    seeds = [int(s) for s in args.policy_seeds.split(",")]
    for name, build in GRID.items():
        if wanted and not any(name.startswith(w) for w in wanted):
            continue
        rows = build()
        draws = [grid_row(rows, settings, seed, baseline_settings) for seed in seeds]
        if len(draws) == 1:
            ours, best = draws[0]
            print(f"{name:26s} session_kv {ours:9,.1f} ms, best baseline {best:9,.1f} ms: {ours / best:.3f}x")
            continue
        per_seed = " / ".join(f"{ours / best:.3f}" for ours, best in draws)
        ours, best = (float(np.mean(d)) for d in zip(*draws, strict=True))
        figures = f"session_kv {ours:9,.1f} ms, best baseline {best:9,.1f} ms: {ours / best:.3f}x"
        print(f"{name:26s} {figures} ({per_seed})")


def grid_row(
    rows: list[TraceRow],
    settings: dict[str, object],
    seed: int,
    baseline_settings: dict[str, object] | None = None,
) -> tuple[float, float]:
    """`session_kv`'s mean TTFT (ms) and the better baseline's, both with the policies' draws of `seed`."""
    best = min(mean_ttft_ms(replay(rows, p, baseline_settings or {}, seed)) for p in BASELINES)
    return mean_ttft_ms(replay(rows, "session_kv", settings, seed)), best


if __name__ == "__main__":
    main()
