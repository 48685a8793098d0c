"""The `kvgate` command line: one entry point, one sub-command per job.

Each sub-command lives beside the code it drives, as a module with `add_arguments(parser)` and
`run(args) -> int`; it is imported only when its command is named (or for `--help`), so `kvgate worker
--engine mock` never pays for importing torch.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Sequence
from types import ModuleType

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("gateway.up", "start NATS, workers and the gateway in one command"),
    "gateway": ("gateway.serve", "run the routing gateway against a NATS bus"),
    "worker": ("engines.serve", "run one inference worker (torch or mock engine)"),
    "bridge": ("engines.bridge_cli", "bridge a vLLM/SGLang server's ZMQ KV events onto the bus"),
    "sim": ("loadgen.sim.cli", "replay a trace against simulated workers, comparing policies"),
    "loadgen": ("loadgen.cli", "generate agentic load or replay a trace against an endpoint"),
    "trace": ("loadgen.trace_cli", "convert public traces (kv-cache-tester, Mooncake) into kvgate rows"),
}

# name -> (module, one-line help), under `kvgate bench`
BENCHMARKS: dict[str, tuple[str, str]] = {
    "router": ("gateway.router_bench", "hashing, routing and event ingestion at scale"),
    "engine": ("engines.bench", "TTFT with and without cache, prefill and decode speed"),
    "gateway": ("gateway.bench", "proxy overhead against calling a worker directly"),
    "gateway-ab": ("gateway.ab_bench", "gateway CPU per request of two kvgate copies, alternating"),
    "replay": ("gateway.replay_bench", "catch-up time of a new replica from snapshot and tail"),
    "soak": ("gateway.soak_bench", "gateway memory kept per request after warm-up (unique sessions)"),
    "live": ("gateway.live_bench", "one seeded workload against live systems (kvgate policies, peers)"),
}


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, "(default: 8000)", unless the help already gives it or
    there is none to give (None, empty, a switch that is off)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default in ("", [])
        if unset or action.default == argparse.SUPPRESS or action.nargs == 0:
            return text
        if any(said in text for said in ("(default", "default:", "; default", "%(default)")):
            return text
        return f"{text} (default: %(default)s)"


def _load(module_name: str) -> ModuleType | None:
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None  # command not built yet
        raise


def _add_commands(
    subparsers: argparse._SubParsersAction, table: dict[str, tuple[str, str]], named: str | None
) -> None:
    """One sub-parser per command; only the `named` one's module is imported (all when None)."""
    for name, (module_name, help_text) in table.items():
        if named is not None and name != named:
            subparsers.add_parser(name, help=help_text, description=help_text)
            continue
        module = _load(module_name)
        if module is None:
            continue
        sub = subparsers.add_parser(
            name, help=help_text, description=help_text, formatter_class=DefaultsHelpFormatter
        )
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line; given `argv`, only the command it names is imported (the top-level help
    needs no module: a command's one-line help is in the tables above)."""
    words = [w for w in (argv or []) if not w.startswith("-")]
    command = words[0] if words else ""
    parser = argparse.ArgumentParser(
        prog="kvgate", description="Agent-session-aware KV routing gateway for LLM inference."
    )
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND")
    _add_commands(subparsers, COMMANDS, command if argv is not None else None)
    bench = subparsers.add_parser("bench", help="benchmarks", description="benchmarks")
    benchmark = words[1] if command == "bench" and len(words) > 1 else ""
    _add_commands(
        bench.add_subparsers(title="benchmarks", metavar="BENCH"),
        BENCHMARKS,
        benchmark if argv is not None else None,
    )
    bench.set_defaults(_run=lambda _args: _usage(bench))
    return parser


def _usage(parser: argparse.ArgumentParser) -> int:
    """`kvgate bench` without a benchmark: its help, and the usage error's exit status."""
    parser.print_help()
    return 2


def _exit_on_sigterm(_signum: int, _frame: object) -> None:
    raise SystemExit(143)


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    run = getattr(args, "_run", None)
    if run is None:
        parser.print_help()
        return 2
    if argv[:1] == ["bench"]:
        # a benchmark's NATS server, workers and gateways run in sessions of their own: SIGTERM must
        # unwind its `finally` blocks as Ctrl-C does, or they outlive it
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
