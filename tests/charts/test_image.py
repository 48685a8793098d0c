"""The container image against what the Helm chart runs in it.

This machine has no Docker daemon, so the image is never built here. What can be checked is checked
with real parts: the chart rendered by Helm's own library (as in test_kvgate_chart.py), its commands
parsed by the real `kvgate` argparse parser, the probes' paths looked up in the real aiohttp apps, and
the ports the Dockerfile exposes (the build itself: test_dockerfile.py).
"""

from __future__ import annotations

import importlib
import json
import re
from typing import Any
from urllib.parse import urlsplit

import pytest

from engines.engine import Engine, EngineConfig
from engines.loop import EngineLoop
from engines.mock import MockRunner
from engines.worker import WorkerApp, WorkerSettings
from gateway.app import Gateway
from gateway.cli import COMMANDS, build_parser
from gateway.config import GatewayConfig
from tests.charts.chart_render import (
    BRIDGE_TARGETS,
    EXTERNAL_NATS,
    container,
    find,
    merge,
    notes,
    render,
    substitute_env,
    values_file,
)
from tests.charts.docker_build import (
    PYPROJECT,
    ROOT,
    dockerfile,
    exposed_ports,
)

WORKLOADS = ("Deployment", "StatefulSet")


# --- the chart's commands and ports against the image


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
