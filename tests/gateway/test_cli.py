"""`kvgate`'s entry point: one command's module imported per run, every command still listed."""

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
