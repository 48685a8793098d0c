"""Every shell and Python block of README.md works as written, from the repository root.

The blocks run in a copy of the repository's files (what a fresh clone has: no local traces, runs or
caches), one after another, with the `kvgate` of this environment. The first line of a block may say:

- `# kvgate-readme: skip (why)`: it cannot run on a CI machine (installs from the network, a GPU,
  Docker, a cluster, placeholders for your hosts); the reason is required.
- `# kvgate-readme: needs kvgate up --engine mock`: it talks to a running system; the test starts
  `kvgate up --engine mock` on a free port (its workers 20 times faster than the modelled GPU, to keep
  CI short: the README's durations and request counts stay as a user types them) and sets
  `OPENAI_BASE_URL` to it.

No block may reach outside the repository (`../`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.kvgate_up import running_kvgate_up

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"#\s*kvgate-readme:\s*(?P<what>skip|needs)\b(?P<rest>.*)")
NEEDS_UP = "kvgate up --engine mock"
RUNNABLE = {"bash": "bash", "sh": "bash", "shell": "bash", "python": "python"}
BLOCK_TIMEOUT_S = 240


class Block:
    def __init__(self, line: int, language: str, text: str) -> None:
        self.line = line
        self.language = language
        self.text = text
        first = text.lstrip().splitlines()[0] if text.strip() else ""
        found = MARKER.match(first)
        self.marker = found["what"] if found else None
        self.detail = found["rest"].strip() if found else ""

    def __repr__(self) -> str:
        return f"README.md:{self.line} ({self.language})"


def readme_blocks() -> list[Block]:
    """The fenced blocks in a language that runs, with the line of their opening fence."""
    blocks: list[Block] = []
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        opening = re.match(r"^```(\w+)\s*$", lines[i])
        if opening is None:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        if opening[1] in RUNNABLE:
            blocks.append(Block(i + 1, RUNNABLE[opening[1]], "\n".join(lines[i + 1 : end]) + "\n"))
        i = end + 1
    return blocks


BLOCKS = readme_blocks()


def test_every_block_runs_or_says_why_not() -> None:
    assert len(BLOCKS) > 5
    for block in BLOCKS:
        if block.marker == "skip":
            assert re.fullmatch(r"\(.+\)", block.detail), f"{block}: a skip needs its reason in ()"
        if block.marker == "needs":
            assert block.detail == NEEDS_UP, f"{block}: only `needs {NEEDS_UP}` is provided"
        assert "../" not in block.text, f"{block} reaches outside the repository"
    assert any(b.marker is None for b in BLOCKS) and any(b.marker == "needs" for b in BLOCKS)


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's tracked files (a fresh clone's), copied; the untracked ones when git is absent."""
    dest = tmp_path_factory.mktemp("clone") / "kvgate"
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
    if listed.returncode == 0 and listed.stdout:
        for name in filter(None, listed.stdout.decode().split("\0")):
            source = ROOT / name
            if source.is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, dest / name)
    else:
        ignore = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", ".*_cache", "runs")
        shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


@pytest.fixture(scope="module")
def mock_system(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`kvgate up --engine mock` on a free port, for the blocks that need it; its /v1 URL."""
    log_path = tmp_path_factory.mktemp("up") / "up.log"
    with running_kvgate_up(["--engine", "mock", "--worker-args", "--speedup 20"], log_path) as url:
        yield url + "/v1"


@pytest.mark.slow
@pytest.mark.parametrize("block", [b for b in BLOCKS if b.marker != "skip"], ids=repr)
def test_the_block_runs_as_written(block: Block, clone: Path, request: pytest.FixtureRequest) -> None:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this `kvgate`
    env.pop("OPENAI_BASE_URL", None)
    if block.marker == "needs":
        env["OPENAI_BASE_URL"] = request.getfixturevalue("mock_system")
    argv = ["bash", "-euo", "pipefail", "-c", block.text]
    if block.language == "python":
        argv = [sys.executable, "-c", block.text]
    run = subprocess.run(
        argv, cwd=clone, env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S, check=False
    )
    assert run.returncode == 0, f"{block} failed:\n{block.text}\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
