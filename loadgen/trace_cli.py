"""`kvgate trace import`: convert a public trace (kv-cache-tester sessions, Mooncake JSONL) into the
kvgate trace rows that `kvgate loadgen --trace` and `kvgate sim --trace` replay."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loadgen.trace import TraceError
from loadgen.trace_import import (
    FORMATS,
    KvCacheTesterImport,
    import_mooncake,
    load_kv_cache_tester,
    write_rows,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(title="actions", metavar="ACTION")
    imp = actions.add_parser(
        "import",
        help="convert a public trace into kvgate rows",
        description=__doc__,
        formatter_class=parser.formatter_class,  # kvgate's: each flag's default in its help
    )
    imp.add_argument("format", choices=FORMATS, help="the input's format")
    imp.add_argument(
        "inputs", nargs="+", type=Path, help="input files (kv-cache-tester: *.json files or their folder)"
    )
    imp.add_argument("-o", "--out", type=Path, required=True, help="the kvgate JSONL trace to write")
    imp.add_argument(
        "--session-gap-s",
        type=float,
        default=15.0,
        help="kv-cache-tester: mean seconds between session starts (Poisson; the source has none)",
    )
    imp.add_argument("--seed", type=int, default=0, help="kv-cache-tester: seed of the session starts")
    imp.add_argument(
        "--max-turns", type=int, default=0, help="kv-cache-tester: cut each session after N turns (0: none)"
    )
    imp.set_defaults(_action=run_import)


def run(args: argparse.Namespace) -> int:
    action = getattr(args, "_action", None)
    if action is None:
        print("kvgate trace: name an action (kvgate trace import --help)", file=sys.stderr)
        return 2
    return int(action(args))


def run_import(args: argparse.Namespace) -> int:
    try:
        if args.format == "mooncake":
            rows = import_mooncake(args.inputs)
            skipped = 0
        else:
            importer = KvCacheTesterImport(args.session_gap_s, args.seed, args.max_turns)
            rows = importer.convert(load_kv_cache_tester(args.inputs))
            skipped = importer.skipped
        count = write_rows(rows, args.out)
    except (TraceError, OSError) as exc:
        print(f"kvgate trace import: {exc}", file=sys.stderr)
        return 1
    sessions = len({row.session_id for row in rows if row.session_id is not None})
    note = f", {skipped} requests without input skipped" if skipped else ""
    print(f"wrote {count} rows ({sessions} sessions{note}) to {args.out}")
    return 0
