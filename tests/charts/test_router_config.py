"""`gateway.routerConfig` in the chart: rendered by Helm's own library into a ConfigMap that the gateway
pod mounts and reads with `--router-config`, checked with the real `kvgate` parser and the gateway's own
loader (the same code `kvgate gateway` runs at start)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import helm_python as helm
import msgspec
import pytest

from gateway.cli import build_parser
from gateway.settings import RouterConfigError, router_config_from
from router.config import RouterConfig
from tests.charts.chart_render import (
    CHART,
    EXTERNAL_NATS,
    KUBE_VERSION,
    container,
    find,
    merge,
    render,
    substitute_env,
    validate_all,
)

TUNED = {"session_admission": True, "stall_factor": 1.5, "pin_max_s": 60, "admission_max_held": 512}


def gateway_of(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = find(docs, "Deployment", "gateway")
    return deployment


def mounted_files(docs: list[dict[str, Any]], root: Path) -> None:
    """Write each ConfigMap the gateway mounts under `root` + its mountPath, as the kubelet would."""
    pod = gateway_of(docs)["spec"]["template"]["spec"]
    maps = {d["metadata"]["name"]: d for d in find(docs, "ConfigMap")}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for mount in container(gateway_of(docs)).get("volumeMounts", []):
        data = maps[volumes[mount["name"]]["configMap"]["name"]]["data"]
        folder = root / mount["mountPath"].lstrip("/")
        folder.mkdir(parents=True, exist_ok=True)
        for key, text in data.items():
            (folder / key).write_text(text)


def loaded(docs: list[dict[str, Any]], root: Path) -> RouterConfig:
    """The RouterConfig the rendered gateway command would load from its mounted files."""
    spec = container(gateway_of(docs))
    args = build_parser().parse_args(substitute_env(spec["args"], spec.get("env", [])))
    if args.router_config is not None:
        assert args.router_config.startswith("/"), "the pod reads an absolute path"
        args.router_config = str(root / args.router_config.lstrip("/"))
    return router_config_from(args)


def test_default_values_have_no_router_config(tmp_path: Path) -> None:
    docs = render(EXTERNAL_NATS)
    assert not find(docs, "ConfigMap")
    gateway = gateway_of(docs)
    assert "--router-config" not in container(gateway)["args"]
    assert "volumes" not in gateway["spec"]["template"]["spec"]
    assert "annotations" not in gateway["spec"]["template"]["metadata"]
    assert loaded(docs, tmp_path) == RouterConfig()


def test_router_config_reaches_the_gateway_through_a_mounted_config_map(tmp_path: Path) -> None:
    values = merge(EXTERNAL_NATS, {"gateway": {"routerConfig": TUNED, "podAnnotations": {"team": "llm"}}})
    docs = render(values)
    validate_all(docs)
    (config_map,) = find(docs, "ConfigMap", "gateway")
    assert msgspec.json.decode(config_map["data"]["router.json"], type=RouterConfig) == RouterConfig(**TUNED)

    mounted_files(docs, tmp_path)
    assert loaded(docs, tmp_path) == RouterConfig(**TUNED)

    annotations = gateway_of(docs)["spec"]["template"]["metadata"]["annotations"]
    digest = hashlib.sha256(config_map["data"]["router.json"].encode()).hexdigest()
    assert annotations == {"checksum/router-config": digest, "team": "llm"}


def test_a_changed_router_config_rolls_the_gateway_pods() -> None:
    def checksum(router_config: dict[str, Any]) -> str:
        docs = render(merge(EXTERNAL_NATS, {"gateway": {"routerConfig": router_config}}))
        return gateway_of(docs)["spec"]["template"]["metadata"]["annotations"]["checksum/router-config"]

    assert checksum(TUNED) == checksum(dict(reversed(TUNED.items())))  # same settings, same pods
    assert checksum(TUNED) != checksum({**TUNED, "stall_factor": 2.5})


def test_an_unknown_field_fails_the_gateway_start_with_its_name(tmp_path: Path) -> None:
    """Helm cannot know RouterConfig's names; the gateway refuses the pod's file with a clear line."""
    docs = render(merge(EXTERNAL_NATS, {"gateway": {"routerConfig": {"session_admision": True}}}))
    mounted_files(docs, tmp_path)
    with pytest.raises(
        RouterConfigError, match=r"/etc/kvgate/router\.json: unknown field 'session_admision'"
    ):
        loaded(docs, tmp_path)


@pytest.mark.parametrize(
    "bad",
    [
        {"routerConfig": "session_admission=true"},
        {"routerConfig": {"stall_factor": "high"}},
        {"routerConfig": {"Bad-Name": 1}},
    ],
)
def test_schema_rejects_bad_router_config(bad: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(chart.merge_values(merge(EXTERNAL_NATS, {"gateway": bad})))


def test_schema_value_types_cover_every_router_config_field() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    allowed = set(
        schema["properties"]["gateway"]["properties"]["routerConfig"]["additionalProperties"]["type"]
    )
    allowed |= {"integer"} if "number" in allowed else set()
    (_, components) = msgspec.json.schema_components([RouterConfig])
    fields = components["RouterConfig"]["properties"]
    assert fields.keys() == set(RouterConfig.__struct_fields__)
    for name, field in fields.items():
        assert field["type"] in allowed, (name, field)


def test_lint_accepts_a_router_config() -> None:
    values = merge(EXTERNAL_NATS, {"gateway": {"routerConfig": TUNED}})
    report = helm.lint(CHART, values, namespace="llm", kube_version=f"v{KUBE_VERSION}.0")
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert all("missing these dependencies: nats" in m["error"] for m in problems), problems
