"""`kvgate`'s entry point: one command's module imported per run, every command still listed."""

import argparse
import subprocess
import sys

import pytest

from gateway.cli import BENCHMARKS, COMMANDS, build_parser

PROBE = """
import sys
from gateway.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print("imported:" + ",".join(sorted(m for m in {modules!r} if m in sys.modules)))
"""


def imported_by(argv: list[str], modules: list[str]) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(argv=argv, modules=modules)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    listed = out.rpartition("imported:")[2].strip()
    return set(filter(None, listed.split(",")))


def test_a_command_imports_only_its_own_module() -> None:
    others = [module for module, _ in COMMANDS.values()] + [module for module, _ in BENCHMARKS.values()]
    assert imported_by(["sim", "--help"], others) == {"loadgen.sim.cli"}
    assert imported_by(["bench", "router", "--help"], others) == {"gateway.router_bench"}
    assert imported_by(["--help"], others) == set()


def test_the_help_lists_every_command_without_importing_them(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser(["--help"]).parse_args(["--help"])
    listed = capsys.readouterr().out
    assert all(name in listed for name in COMMANDS) and "bench" in listed


def test_the_named_command_parses_as_with_every_command_loaded() -> None:
    argv = ["sim", "--trace", "t.jsonl", "--policy", "kv_overlap", "--workers", "4"]
    lazy = vars(build_parser(argv).parse_args(argv))
    full = vars(build_parser().parse_args(argv))
    assert lazy == full and lazy["workers"] == 4


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    (subparsers,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[name]


HELPED = [[name] for name in COMMANDS if name != "trace"] + [["bench", name] for name in BENCHMARKS]


@pytest.mark.parametrize("argv", [*HELPED, ["trace", "import"]], ids=" ".join)
def test_every_flag_says_what_it_does_and_its_default(argv: list[str]) -> None:
    parser = build_parser(argv)
    for word in argv:
        parser = _subparser(parser, word)
    formatter = parser._get_formatter()
    missing = []
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        text = formatter._expand_help(action) if action.help else ""
        unset = action.default is None or action.default is False or action.default in ("", [])
        has_default = not unset and action.default != argparse.SUPPRESS and action.nargs != 0
        if not text or (has_default and "default" not in text):
            missing.append(action.option_strings[0])
    assert not missing, f"kvgate {' '.join(argv)}: no help or no default shown for {missing}"
