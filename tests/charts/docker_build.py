"""The image's build, read from the repository's own files with Docker's rules: the Dockerfile parsed
into stages and instructions, .dockerignore's matcher (moby/patternmatcher), and the files the build
stage copies. No Docker daemon is needed."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- the Dockerfile, parsed


@dataclass
class Instruction:
    keyword: str  # upper case
    value: str  # the rest of the logical line, continuations joined
    line: int

    def words(self) -> list[str]:
        """Exec form (a JSON array) as given, shell form split like a shell."""
        if self.value.startswith("["):
            return json.loads(self.value)
        return shlex.split(self.value)


@dataclass
class Stage:
    image: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def args(self) -> dict[str, str]:
        """`ARG NAME=default` of this stage."""
        out = {}
        for ins in self.all("ARG"):
            name, _, default = ins.value.partition("=")
            out[name] = default.strip('"')
        return out

    def env(self) -> dict[str, str]:
        out = {}
        for ins in self.all("ENV"):
            for word in ins.words():
                key, _, value = word.partition("=")
                out[key] = value
        return out


def parse_dockerfile(text: str) -> list[Stage]:
    """Logical lines (`\\` continuations joined, comments dropped) grouped into stages at each FROM."""
    stages: list[Stage] = []
    pending, start = "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker drops comment lines, inside a continuation too
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, value = (pending + line).partition(" ")
        pending = ""
        ins = Instruction(keyword.upper(), value.strip(), start)
        if ins.keyword == "FROM":
            image, _, name = ins.value.partition(" AS ")
            stages.append(Stage(image.strip(), name.strip()))
        else:
            assert stages, f"line {number}: {ins.keyword} before any FROM"
            stages[-1].instructions.append(ins)
    assert not pending, "the Dockerfile ends in a line continuation"
    return stages


def dockerfile() -> list[Stage]:
    return parse_dockerfile((ROOT / "Dockerfile").read_text())


def exposed_ports(stage: Stage) -> set[int]:
    return {int(word.split("/")[0]) for ins in stage.all("EXPOSE") for word in ins.words()}


# --- .dockerignore, with Docker's rules (moby/patternmatcher)


class DockerIgnore:
    """A path is left out of the build context when the last pattern matching it, or one of its parent
    folders, is not a `!` exception. `*` and `?` stay within one path segment; `**` spans several."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[re.Pattern[str], bool]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            pattern = line.lstrip("!").strip().strip("/")
            self.rules.append((re.compile(self._regex(pattern)), include))

    @staticmethod
    def _regex(pattern: str) -> str:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + fnmatch.translate(pattern[i : end + 1])[4:-3], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return f"^{out}$"

    def excludes(self, path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        excluded = False
        for regex, include in self.rules:
            if any(regex.match(p) for p in prefixes):
                excluded = not include
        return excluded


def dockerignore() -> DockerIgnore:
    return DockerIgnore((ROOT / ".dockerignore").read_text())


# --- what the build stage copies


def build_stage_files(stage: Stage) -> dict[str, Path]:
    """Destination (relative to WORKDIR) -> source, for every context file the stage's COPYs take.
    Docker's rules: a folder source copies its contents (several folders to one destination merge)."""
    ignore = dockerignore()
    workdir = ""
    out: dict[str, Path] = {}
    for ins in stage.instructions:
        if ins.keyword == "WORKDIR":
            workdir = ins.value
        if ins.keyword != "COPY" or ins.value.startswith("--from"):
            continue
        *sources, dest = ins.words()
        assert workdir and not dest.startswith("/"), f"line {ins.line}: COPY into WORKDIR, relatively"
        for source in sources:
            path = ROOT / source
            assert path.exists(), f"line {ins.line}: COPY {source}: not in the repository"
            files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
            for file in files:
                rel = file.relative_to(ROOT).as_posix()
                if ignore.excludes(rel):
                    continue
                if path.is_file():
                    target = dest + file.name if dest.endswith("/") or len(sources) > 1 else dest
                else:
                    target = f"{dest.rstrip('/')}/{file.relative_to(path).as_posix()}"
                out[str(Path(target))] = file
    return out


def package_dirs() -> list[str]:
    """The top-level packages pyproject.toml's package discovery includes (`gateway*` -> `gateway`)."""
    return [p.rstrip("*").rstrip(".") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]]


def repo_sources() -> Iterator[Path]:
    for package in package_dirs():
        yield from (p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)
