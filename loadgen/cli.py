"""`kvgate loadgen`: agentic/chat/prefix load or trace replay against an OpenAI-compatible URL.

`kvgate loadgen compare DIR DIR...` writes a side-by-side report of earlier runs instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from loadgen.apis import API_NAMES, FORMATS
from loadgen.distributions import Distribution, DistributionError, parse_distribution
from loadgen.metrics import Recorder
from loadgen.report import ReportError, Results, write_comparison, write_report, write_results
from loadgen.trace import TRACE_BLOCK_SIZE, TraceContent, TraceError, TraceRow, load_trace

if TYPE_CHECKING:  # imported where used, as in `_main`: `kvgate --help` imports this module
    from loadgen.client import StreamClient
    from loadgen.driver import Driver, RunConfig

WORKLOADS = ("agentic", "chat", "prefix")
DEFAULT_DURATION_S = 60.0  # a synthetic workload never ends by itself

# option -> (workload config field, help); defaults come from the workload's config class
DISTRIBUTION_OPTIONS: dict[str, tuple[str, str]] = {
    "--turns": ("turns", "turns per session (agentic, chat)"),
    "--tool-time": ("tool_time_s", "tool/think seconds before a turn with a tool result (agentic)"),
    "--tool-result-len": ("tool_result_tokens", "tool result tokens appended per turn (agentic)"),
    "--system-len": (
        "system_tokens",
        "system prompt + tool definitions tokens, per agent type (agentic, chat)",
    ),
    "--task-len": ("task_tokens", "tokens of a session's first user message (agentic)"),
    "--think-time": ("think_time_s", "user think seconds between turns (chat)"),
    "--user-len": ("user_tokens", "user message tokens (chat)"),
    "--prefix-len": ("prefix_tokens", "shared prefix tokens (prefix)"),
    "--suffix-len": ("suffix_tokens", "per-request tokens after the prefix (prefix)"),
    "--output-len": ("output_tokens", "max_tokens per request (all synthetic workloads)"),
}


def _distribution(spec: str) -> Distribution:
    try:
        return parse_distribution(spec)
    except DistributionError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _defaults(field: str) -> str:
    from loadgen.workloads import AgenticConfig, ChatConfig, PrefixConfig

    found = [
        f"{name} {getattr(config, field)}"
        for name, config in (("agentic", AgenticConfig()), ("chat", ChatConfig()), ("prefix", PrefixConfig()))
        if hasattr(config, field)
    ]
    return ", ".join(found)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action", nargs="*", metavar="compare DIR", help="`compare DIR DIR...`: compare earlier runs"
    )
    _add_target_arguments(parser)
    _add_load_arguments(parser)
    _add_shape_arguments(parser)
    _add_replay_arguments(parser)
    _add_output_arguments(parser)


def _add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the turns go and how they are sent."""
    target = parser.add_argument_group("target")
    target.add_argument(
        "--url",
        default=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000"),
        help="OpenAI-compatible base URL, with or without /v1 [OPENAI_BASE_URL] (default %(default)s)",
    )
    target.add_argument("--model", help="model name (default: the first of GET /v1/models)")
    target.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token ($OPENAI_API_KEY)"
    )
    target.add_argument(
        "--api",
        choices=API_NAMES,
        default="chat",
        help="the API the turns are sent through: chat (/v1/chat/completions), messages (Anthropic's "
        "/v1/messages) or responses (OpenAI's /v1/responses, whole conversation each turn, store false)",
    )
    target.add_argument(
        "--no-session-header", action="store_true", help="send no x-session-id / tool-call marker"
    )
    target.add_argument(
        "--plain-tools",
        action="store_true",
        help="agentic: tool definitions, calls and results as prompt text, not `tools`/`tool_calls` "
        "(for servers without a tool-call parser, e.g. vLLM without --enable-auto-tool-choice)",
    )
    target.add_argument(
        "--ignore-eos", action="store_true", help='add "ignore_eos": true (vLLM, SGLang, kvgate)'
    )
    target.add_argument(
        "--extra-body", type=json.loads, default=None, help="JSON object merged into every body"
    )


def _add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """What is sent, at what rate, for how long."""
    load = parser.add_argument_group("load")
    load.add_argument("--workload", choices=WORKLOADS, default="agentic", help="default %(default)s")
    load.add_argument(
        "--trace", type=Path, help="replay this trace (traces/README.md format) instead of a workload"
    )
    arrival = load.add_mutually_exclusive_group()
    arrival.add_argument(
        "--rate", type=float, help="new sessions per second, Poisson (default 1; 0 = all at once)"
    )
    arrival.add_argument("--concurrency", type=int, help="closed loop: this many sessions live at all times")
    load.add_argument(
        "--duration",
        type=float,
        help=f"seconds to send for, 0 for no limit (default {DEFAULT_DURATION_S:g} for a workload without"
        " --requests; none with --requests or --trace). With --requests too, whichever comes first ends"
        " the run",
    )
    load.add_argument(
        "--requests", type=int, help="stop after sending this many requests (default: no limit)"
    )
    load.add_argument(
        "--warmup", type=float, default=0.0, help="seconds whose requests the summary leaves out"
    )
    load.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    load.add_argument(
        "--max-concurrency", type=int, default=512, help="requests in flight at most (default %(default)s)"
    )
    load.add_argument(
        "--timeout", type=float, default=600.0, help="seconds per request (default %(default)s)"
    )
    load.add_argument(
        "--drain",
        type=float,
        default=30.0,
        help="seconds in-flight requests get after the end (default %(default)s)",
    )
    load.add_argument(
        "--max-think-s", type=float, default=60.0, help="cap on every think/tool delay (default %(default)s)"
    )


def _add_shape_arguments(parser: argparse.ArgumentParser) -> None:
    """The generated workloads' shape: sizes, turns, tool times."""
    shape = parser.add_argument_group(
        "workload shape (distributions: const:X, uniform:A,B, exp:MEAN, "
        "lognormal:MEDIAN,SIGMA, each with optional ,min=X,max=Y)"
    )
    shape.add_argument(
        "--agent-types",
        type=int,
        default=4,
        help="agents with their own system prompt and tools (default %(default)s)",
    )
    shape.add_argument(
        "--prefixes", type=int, default=8, help="shared prefixes (prefix workload; default %(default)s)"
    )
    shape.add_argument(
        "--chars-per-token", type=float, default=1.0, help="1 for a byte tokenizer (default), ~3 for BPE"
    )
    shape.add_argument(
        "--max-context",
        type=int,
        help="prompt + reply tokens a request may take: sessions end before it, replies and trace rows"
        " are cut to it (default: the max_model_len of GET /v1/models less a margin; none if not given)",
    )
    for option, (field, help_text) in DISTRIBUTION_OPTIONS.items():
        shape.add_argument(option, type=_distribution, help=f"{help_text}; default {_defaults(field)}")


def _add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    """Trace replay."""
    replay = parser.add_argument_group("trace replay")
    replay.add_argument(
        "--rate-scale",
        type=float,
        default=1.0,
        help="trace time (arrivals and delays) runs this much faster (default 1)",
    )
    replay.add_argument("--limit", type=int, help="replay the first N rows")
    replay.add_argument(
        "--trace-block-size",
        type=int,
        default=TRACE_BLOCK_SIZE,
        help="tokens per trace hash id (default %(default)s)",
    )


def _add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the results go."""
    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, help="write results.json, report.md and charts here")
    output.add_argument("--no-progress", action="store_true", help="no live display")


def _fail(message: str) -> int:
    print(f"kvgate loadgen: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    if args.action:
        if args.action[0] != "compare":
            return _fail(f"unknown action {args.action[0]!r} (only `compare DIR DIR...`)")
        out = args.out or Path("loadgen-compare")
        try:
            paths = write_comparison([Path(d) for d in args.action[1:]], out)
        except ReportError as exc:
            return _fail(str(exc))
        print(f"wrote {', '.join(str(p) for p in paths)}")
        return 0
    try:
        _check(args)
        rows = _load_rows(args) if args.trace is not None else None
    except (ValueError, OSError) as exc:
        return _fail(str(exc))
    return _run_loop(_main(args, rows))


def _check(args: argparse.Namespace) -> None:
    # written `not x >= 0`, not `x < 0`: a NaN (`--rate nan`) fails every comparison
    if args.rate is not None and not args.rate >= 0:
        raise ValueError("--rate must be >= 0")
    if args.rate == 0 and args.requests is None and args.trace is None:
        raise ValueError("--rate 0 (every session at once) needs --requests")
    for name in (
        "concurrency",
        "max_concurrency",
        "requests",
        "limit",
        "agent_types",
        "prefixes",
        "max_context",
    ):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("timeout", "chars_per_token", "rate_scale"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0")
    for name in ("duration", "warmup", "drain", "max_think_s"):
        if not (getattr(args, name) or 0) >= 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
    if args.extra_body is not None and not isinstance(args.extra_body, dict):
        raise ValueError("--extra-body must be a JSON object")


def _with_distributions(config: msgspec.Struct, args: argparse.Namespace) -> msgspec.Struct:
    changes: dict[str, Distribution | float | int | bool | None] = {"chars_per_token": args.chars_per_token}
    fields = set(config.__struct_fields__)
    if "max_context_tokens" in fields:
        changes["max_context_tokens"] = args.max_context
    if "plain_tools" in fields:
        changes["plain_tools"] = args.plain_tools
    for option, (field, _) in DISTRIBUTION_OPTIONS.items():
        value = getattr(args, option.lstrip("-").replace("-", "_"))
        if value is not None and field in fields:
            changes[field] = value
    return msgspec.structs.replace(config, **changes)


def _load_rows(args: argparse.Namespace) -> list[TraceRow]:
    try:
        rows = load_trace(args.trace, args.limit)
    except TraceError as exc:
        raise ValueError(str(exc)) from exc
    if not rows:
        raise ValueError(f"{args.trace}: no rows")
    return rows


def duration_s(args: argparse.Namespace) -> float | None:
    """The run's time limit: --duration, else 60 s unless --requests or the trace ends the run."""
    if args.duration is not None:
        return args.duration or None
    return None if args.requests is not None or args.trace is not None else DEFAULT_DURATION_S


def build_workload(
    args: argparse.Namespace, rows: list[TraceRow] | None, context: int | None
) -> tuple[Any, str]:
    """The workload sized to `context` tokens (prompt + reply; None: unbounded), and a line saying how."""
    from loadgen import workloads
    from loadgen.fit import fit_trace
    from loadgen.replay import TraceWorkload

    if rows is not None:
        note = f"{len(rows)} trace rows"
        if context is not None:
            fit = fit_trace(rows, context, args.chars_per_token)
            if not fit.rows:
                raise ValueError(f"none of the {len(rows)} trace rows fits in {context} tokens")
            if fit.left_out:
                note = (
                    f"{fit.left_out} of {len(rows)} trace rows need more than {context} tokens and are left"
                    f" out ({fit.sessions_cut} sessions end early)"
                )
            rows = fit.rows
        content = TraceContent(trace_block_size=args.trace_block_size, seed=args.seed)
        workload = TraceWorkload(rows, content, max_think_s=args.max_think_s, rate_scale=args.rate_scale)
        return workload, note
    rate = 1.0 if args.rate is None else args.rate
    sized: Any
    if args.workload == "agentic":
        config = _with_distributions(workloads.AgenticConfig(agent_types=args.agent_types), args)
        sized = workloads.AgenticWorkload(_sized(config, context), rate, args.seed)
        what, option = "system prompt and tools", "--system-len"
    elif args.workload == "chat":
        config = _with_distributions(workloads.ChatConfig(), args)
        sized = workloads.ChatWorkload(_sized(config, context), rate, args.seed)
        what, option = "system prompt", "--system-len"
    else:
        config = _with_distributions(workloads.PrefixConfig(prefixes=args.prefixes), args)
        sized = workloads.PrefixWorkload(_sized(config, context), rate, args.seed)
        what, option = "shared prefix", "--prefix-len"
    room = sized.system_room()
    if room is not None and room < MIN_ROOM_TOKENS:
        raise ValueError(
            f"the {what} take nearly all of the {context} tokens a request may use: lower {option}"
            " or raise --max-context"
        )
    if context is None:
        return sized, "prompts unbounded (the server gave no max_model_len; --max-context to set one)"
    if args.workload == "prefix":
        return sized, f"questions and replies cut to fit {context} tokens"
    return sized, f"sessions end before prompt + reply exceed {context} tokens, replies cut to fit"


MIN_ROOM_TOKENS = 64  # a first turn needs a task and a reply beside the system prompt


def _sized(config: msgspec.Struct, context: int | None) -> Any:
    return msgspec.structs.replace(config, max_context_tokens=context)


def _run_loop(coro: Any) -> int:
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(coro)


def _plan(args: argparse.Namespace, served: Any, sizing: str) -> str:
    """One line before the run: what is sent where, how it is sized, and what ends the run."""
    limit = duration_s(args)
    ends = [f"{limit:g} s (--duration)"] if limit is not None else []
    if args.requests is not None:
        ends.append(f"{args.requests} requests (--requests)")
    end = " or ".join(ends) + (", whichever comes first" if len(ends) > 1 else "")
    what = f"trace {args.trace}" if args.trace is not None else f"{args.workload} workload"
    length = f", max_model_len {served.max_model_len}" if served.max_model_len else ""
    stop = f"the run ends after {end}" if ends else "the run ends with the workload"
    return f"{what} -> {args.url} (model {served.name}{length}): {sizing}; {stop}"


def _config_record(args: argparse.Namespace, workload: Any, model: str) -> dict[str, Any]:
    record: dict[str, Any] = {
        "workload": "trace" if args.trace else args.workload,
        "url": args.url,
        "model": model,
        "session_header": not args.no_session_header,
        "rate": args.rate,
        "concurrency": args.concurrency,
        "duration_s": duration_s(args),
        "requests": args.requests,
        "warmup_s": args.warmup,
        "seed": args.seed,
        "max_concurrency": args.max_concurrency,
        "max_think_s": args.max_think_s,
    }
    if args.trace:
        record.update(trace=str(args.trace), rate_scale=args.rate_scale, limit=args.limit)
    else:
        for key, value in msgspec.structs.asdict(workload.config).items():
            record[key] = str(value) if isinstance(value, Distribution) else value
    return record


async def _main(args: argparse.Namespace, rows: list[TraceRow] | None) -> int:
    from loadgen.driver import Driver
    from loadgen.fit import context_budget, served_model

    try:
        served = await served_model(args.url, args.api_key, args.model)
        context = args.max_context
        if context is None and served.max_model_len is not None:
            context = context_budget(served.max_model_len)
        workload, sizing = build_workload(args, rows, context)
    except ValueError as exc:
        return _fail(str(exc))
    model = served.name
    print(f"kvgate loadgen: {_plan(args, served, sizing)}", file=sys.stderr)
    recorder = Recorder(warmup_s=args.warmup)
    async with _stream_client(args, model) as client:
        driver = Driver(client, workload, _run_config(args), recorder)
        cpu_start = time.process_time()
        wall = await _drive(driver, args)
    cpu_s = time.process_time() - cpu_start
    # the loadgen's own CPU: a figure near 1 core per second of wall means the loadgen, not the server,
    # may be the bottleneck
    own = {"loadgen_cpu_s": round(cpu_s, 3), "loadgen_cpu_util": round(cpu_s / wall, 3) if wall else None}
    summary = recorder.summary(wall, {**own, "interrupted": driver.interrupted, "ended_by": driver.ended_by})
    if args.out is not None:
        results = Results(
            summary, _config_record(args, workload, model), recorder.requests, recorder.sessions
        )
        write_results(args.out, results)
        write_report(args.out, results)
    print(json.dumps(summary, indent=1))
    return 130 if driver.interrupted else (1 if summary["completed"] == 0 else 0)


def _run_config(args: argparse.Namespace) -> RunConfig:
    from loadgen.driver import RunConfig

    return RunConfig(
        duration_s=duration_s(args),
        requests=args.requests,
        warmup_s=args.warmup,
        concurrency=args.concurrency,
        max_concurrency=args.max_concurrency,
        max_think_s=args.max_think_s,
        drain_s=args.drain,
    )


def _stream_client(args: argparse.Namespace, model: str) -> StreamClient:
    from loadgen.client import StreamClient

    extra_body = dict(args.extra_body or {})
    if args.ignore_eos:
        extra_body["ignore_eos"] = True
    return StreamClient(
        args.url,
        model,
        args.api_key,
        args.timeout,
        args.max_concurrency,
        not args.no_session_header,
        extra_body,
        FORMATS.get(args.api),
    )


async def _drive(driver: Driver, args: argparse.Namespace) -> float:
    """Run the driver to its end (Ctrl-C or SIGTERM stops it cleanly), with the progress display unless
    --no-progress; returns the run's wall seconds."""
    from loadgen.progress import ProgressDisplay

    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        # the first Ctrl-C stops cleanly; a second one falls through to the default handler
        loop.remove_signal_handler(signal.SIGINT)
        driver.interrupt()

    loop.add_signal_handler(signal.SIGINT, on_signal)
    loop.add_signal_handler(signal.SIGTERM, driver.interrupt)
    progress = None
    if not args.no_progress:
        title = f"kvgate loadgen · {'trace' if args.trace else args.workload} → {args.url}"
        progress = asyncio.ensure_future(ProgressDisplay(driver, title).run())
    try:
        return await driver.run()
    finally:
        if progress is not None:
            progress.cancel()
            await asyncio.gather(progress, return_exceptions=True)
        loop.remove_signal_handler(signal.SIGTERM)
        loop.remove_signal_handler(signal.SIGINT)
