"""Every `kvgate COMMAND ... --flag` written in README.md and docs/*.md names a flag that command has.

A renamed or removed option otherwise lives on in the prose (and in the skipped README blocks, which
tests/test_readme.py does not run). Quoted arguments are another program's (`--worker-args "..."`,
`--loadgen-args "..."`) and are not checked here.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from gateway.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMAND = re.compile(r"\bkvgate((?:\s+[a-z][a-z_-]*)+)([^`\n]*)")
QUOTED = re.compile(r"\"[^\"]*\"|'[^']*'")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _command(parser: argparse.ArgumentParser, words: list[str]) -> tuple[argparse.ArgumentParser, str]:
    """The deepest sub-command `words` name, and its name."""
    named = ["kvgate"]
    for word in words:
        sub = _subparsers(parser).get(word)
        if sub is None:
            break
        parser = sub
        named.append(word)
    return parser, " ".join(named)


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def unknown_flags(text: str, parser: argparse.ArgumentParser) -> list[str]:
    """`where: command --flag` for each flag a `kvgate` command line in `text` gives that it lacks."""
    text = text.replace("\\\n", " ")  # a shell line continued
    found = []
    for match in COMMAND.finditer(text):
        words = match[1].split()
        command, name = _command(parser, words)
        if command is parser:
            continue  # `kvgate` in prose, not a command line
        rest = " ".join(words) + match[2]
        for flag in FLAG.findall(QUOTED.sub("", rest)):
            if flag not in _options(command):
                line = text.count("\n", 0, match.start()) + 1
                found.append(f"line {line}: {name} {flag}")
    return found


def test_the_checker_finds_a_flag_a_command_lacks() -> None:
    parser = build_parser()
    text = 'run `kvgate sim --trace t.jsonl --no-such-flag 3` or\nkvgate up --worker-args "--anything"'
    assert unknown_flags(text, parser) == ["line 1: kvgate sim --no-such-flag"]
    assert unknown_flags("kvgate trace import mooncake x.jsonl --max-turns 60", parser) == []
    assert unknown_flags("kvgate trace import x --max-turnz 60", parser) == [
        "line 1: kvgate trace import --max-turnz"
    ]


def test_every_documented_flag_exists() -> None:
    parser = build_parser()
    stale = [
        f"{doc.relative_to(ROOT)} {where}" for doc in DOCS for where in unknown_flags(doc.read_text(), parser)
    ]
    assert not stale, "documented flags the commands do not have:\n" + "\n".join(stale)
