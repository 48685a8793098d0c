"""The Helm chart in charts/kvgate, rendered and linted by the real Helm library (helm-python-sdk wraps
Helm's Go SDK) and every manifest validated against the Kubernetes OpenAPI schemas (kubernetes-validate).

This machine cannot download chart dependencies, so renders switch the official NATS subchart off and
point at an external NATS URL; the values handed to that subchart are checked against its official keys.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import helm_python as helm
import pytest
import yaml
from nats import connect as nats_connect

from gateway.cli import build_parser
from gateway.natsd import find_nats_server, free_port
from router.policies import POLICIES
from tests.charts.chart_render import (
    BRIDGE_TARGETS,
    CHART,
    EXTERNAL_NATS,
    KUBE_VERSION,
    container,
    find,
    merge,
    notes,
    render,
    validate_all,
    values_file,
)

# Keys of the official `nats` chart (1.x, nats-io/k8s helm/charts/nats/values.yaml) that kvgate sets.
OFFICIAL_NATS_KEYS = {
    "enabled",  # the dependency's condition in Chart.yaml, read by Helm, not by the subchart
    "config.cluster.enabled",
    "config.cluster.replicas",
    "config.jetstream.enabled",
    "config.jetstream.fileStore.pvc.size",
    "container.patch",  # JSON patches of its container and pod template: the users file's mount
    "podTemplate.patch",
}
# Maps of the official chart whose contents are free: NATS configuration.
OFFICIAL_NATS_FREE = ("config.merge.",)


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def leaf_paths(tree: dict[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from leaf_paths(value, path + ".")
        else:
            yield path


def check_cli(args: list[str], command: str) -> None:
    """The rendered args parse with the real `kvgate` CLI (once that command exists)."""
    parser = build_parser()
    choices = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    if command not in choices:
        pytest.skip(f"`kvgate {command}` is not built yet")
    parser.parse_args([a.replace("$(POD_NAME)", "demo-kvgate-worker-0") for a in args])


# --- default values


def test_default_values_render_valid_manifests() -> None:
    docs = render(EXTERNAL_NATS)
    validate_all(docs)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == [
        "Deployment",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "Secret",
        "Service",
        "Service",
        "StatefulSet",
    ]

    (gateway,) = find(docs, "Deployment", "gateway")
    gw = container(gateway)
    assert gw["command"] == ["kvgate"]
    assert gw["args"][0] == "gateway"
    assert flag(gw["args"], "--nats") == "nats://nats.infra:4222"
    assert flag(gw["args"], "--policy") == "session_kv"
    assert flag(gw["args"], "--namespace") == "kvgate"
    assert gw["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert gw["livenessProbe"]["httpGet"]["path"] == "/health"
    assert "replicas" not in gateway["spec"]  # the HPA owns the count

    (hpa,) = find(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == gateway["metadata"]["name"]
    (pdb,) = find(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == gateway["spec"]["selector"]["matchLabels"]

    (workers,) = find(docs, "StatefulSet", "worker")
    (headless,) = find(docs, "Service", "worker")
    assert headless["spec"]["clusterIP"] == "None"
    assert workers["spec"]["serviceName"] == headless["metadata"]["name"]
    assert workers["spec"]["replicas"] == 2
    wk = container(workers)
    assert flag(wk["args"], "--engine") == "mock"
    assert flag(wk["args"], "--worker-id") == "$(POD_NAME)"
    # Each worker registers the DNS name the headless Service gives its own pod.
    assert flag(wk["args"], "--advertise-url") == "http://$(POD_NAME).demo-kvgate-worker.llm.svc:8000"
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in wk["env"]
    assert "nvidia.com/gpu" not in wk["resources"].get("limits", {})


def test_rendered_args_parse_with_the_kvgate_cli() -> None:
    docs = render(EXTERNAL_NATS)
    check_cli(container(find(docs, "Deployment", "gateway")[0])["args"], "gateway")
    check_cli(container(find(docs, "StatefulSet", "worker")[0])["args"], "worker")


def test_bundled_nats_is_addressed_by_its_service_name() -> None:
    docs = render({})  # nats.enabled defaults to true; the subchart itself is not downloaded here
    gw = container(find(docs, "Deployment", "gateway")[0])
    assert flag(gw["args"], "--nats") == "nats://demo-nats.llm.svc:4222"


# --- HA values


def test_ha_values_render_valid_manifests() -> None:
    docs = render(merge(values_file("values-ha.yaml"), EXTERNAL_NATS))
    validate_all(docs)
    (hpa,) = find(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["minReplicas"] == 2
    (gateway,) = find(docs, "Deployment", "gateway")
    anti = gateway["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]
    assert anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["weight"] == 100
    (pdb,) = find(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 1


def test_nats_dependency_and_its_values_use_the_official_chart() -> None:
    chart_yaml = values_file("Chart.yaml")
    (dep,) = chart_yaml["dependencies"]
    assert dep["name"] == "nats"
    assert dep["repository"] == "https://nats-io.github.io/k8s/helm/charts/"
    assert dep["condition"] == "nats.enabled"

    default, ha = values_file("values.yaml")["nats"], values_file("values-ha.yaml")["nats"]
    for nats in (default, ha):
        unknown = {p for p in leaf_paths(nats) if not p.startswith(OFFICIAL_NATS_FREE)} - OFFICIAL_NATS_KEYS
        assert not unknown, f"not keys of the official nats chart: {unknown}"
        assert nats["enabled"] is True
        assert nats["config"]["jetstream"]["enabled"] is True
    assert default["config"]["cluster"]["enabled"] is False
    assert ha["config"]["cluster"] == {"enabled": True, "replicas": 3}
    assert ha["config"]["jetstream"]["fileStore"]["pvc"]["size"] == "20Gi"


# --- lint


@pytest.mark.parametrize("values_name", ["values.yaml", "values-ha.yaml"])
def test_lint_has_no_errors(values_name: str) -> None:
    values = merge(values_file(values_name), EXTERNAL_NATS)
    report = helm.lint(CHART, values, namespace="llm", kube_version=f"v{KUBE_VERSION}.0")
    assert report["total_charts_linted"] == 1
    assert report["errors"] == []
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    # The only warning allowed is the one this offline machine cannot avoid.
    assert all("missing these dependencies: nats" in m["error"] for m in problems), problems


def test_lint_catches_a_broken_value() -> None:
    values = merge(EXTERNAL_NATS, {"gateway": {"port": "eighty"}})
    report = helm.lint(CHART, values, namespace="llm")
    assert any(m["severity"] == 3 for m in report["messages"]), report


# --- fronting vLLM / SGLang


def test_bridges_replace_builtin_workers() -> None:
    values = merge(
        EXTERNAL_NATS,
        {
            "workers": {"enabled": False},
            "bridges": {"targets": BRIDGE_TARGETS},
        },
    )
    docs = render(values)
    validate_all(docs)
    assert not find(docs, "StatefulSet")
    bridges = {d["metadata"]["name"]: container(d)["args"] for d in find(docs, "Deployment", "bridge")}
    assert set(bridges) == {"demo-kvgate-bridge-vllm-0", "demo-kvgate-bridge-sglang-0"}
    vllm = bridges["demo-kvgate-bridge-vllm-0"]
    assert vllm[0] == "bridge"
    assert flag(vllm, "--zmq") == "tcp://vllm-0.vllm:5557"
    assert flag(vllm, "--replay") == "tcp://vllm-0.vllm:5558"
    assert flag(vllm, "--worker-id") == "vllm-0"
    assert flag(vllm, "--tokenizer") == "/models/llama/tokenizer.json"
    assert flag(vllm, "--nats") == "nats://nats.infra:4222"
    sglang = bridges["demo-kvgate-bridge-sglang-0"]
    assert flag(sglang, "--engine") == "sglang"
    assert flag(sglang, "--block-size") == "1"
    assert "--replay" not in sglang and "--tokenizer" not in sglang
    for args in bridges.values():
        check_cli(args, "bridge")
    assert "vllm-0 (vllm), sglang-0 (sglang)" in notes(values)


def test_nothing_to_route_to_is_called_out() -> None:
    text = notes(merge(EXTERNAL_NATS, {"workers": {"enabled": False}}))
    assert "nowhere to route" in text


# --- options


def test_gpu_workers_request_gpus() -> None:
    docs = render(merge(EXTERNAL_NATS, {"workers": {"engine": "torch", "gpu": {"count": 2}}}))
    validate_all(docs)
    wk = container(find(docs, "StatefulSet", "worker")[0])
    assert wk["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert wk["resources"]["limits"]["memory"] == "4Gi"  # the configured limits stay
    assert flag(wk["args"], "--engine") == "torch"


def test_service_monitor_selects_the_gateway_service() -> None:
    docs = render(merge(EXTERNAL_NATS, {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}))
    validate_all(docs)
    (monitor,) = find(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    selector = monitor["spec"]["selector"]["matchLabels"]
    (service,) = find(docs, "Service", "gateway")
    assert selector.items() <= service["metadata"]["labels"].items()
    (workers,) = find(docs, "Service", "worker")  # workers serve no /metrics: not scraped
    assert not selector.items() <= workers["metadata"]["labels"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_api_key_comes_from_a_secret() -> None:
    docs = render(merge(EXTERNAL_NATS, {"gateway": {"apiKeySecret": {"name": "kvgate-keys"}}}))
    validate_all(docs)
    gw = container(find(docs, "Deployment", "gateway")[0])
    assert flag(gw["args"], "--api-key") == "$(KVGATE_API_KEY)"
    (env,) = [e for e in gw["env"] if e["name"] == "KVGATE_API_KEY"]
    assert env["valueFrom"]["secretKeyRef"] == {"name": "kvgate-keys", "key": "api-key"}
    check_cli(gw["args"], "gateway")
    assert "--api-key" not in container(find(render(EXTERNAL_NATS), "Deployment", "gateway")[0])["args"]


def test_autoscaling_off_sets_replicas() -> None:
    docs = render(merge(EXTERNAL_NATS, {"gateway": {"replicas": 3, "autoscaling": {"enabled": False}}}))
    assert not find(docs, "HorizontalPodAutoscaler")
    assert find(docs, "Deployment", "gateway")[0]["spec"]["replicas"] == 3


# --- volumes: model weights and tokenizers


MODELS_VOLUME = {"name": "models", "persistentVolumeClaim": {"claimName": "models", "readOnly": True}}
MODELS_MOUNT = {"name": "models", "mountPath": "/models", "readOnly": True}
VLLM_TARGET = {
    "name": "vllm-0",
    "url": "http://vllm-0.vllm:8000",
    "zmq": "tcp://vllm-0.vllm:5557",
    "model": "meta-llama/Llama-3.1-8B-Instruct",
    "tokenizer": "/models/llama/tokenizer.json",  # values.yaml's example
}


def pod_volumes(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in doc["spec"]["template"]["spec"].get("volumes", [])}


def mounted(doc: dict[str, Any], path: str) -> bool:
    """Some mount of the pod's container covers `path`, and names a volume the pod has."""
    volumes = pod_volumes(doc)
    for mount in container(doc).get("volumeMounts", []):
        assert mount["name"] in volumes, f"mount of a volume the pod lacks: {mount}"
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            return True
    return False


def documented_examples(section: str) -> dict[str, list[dict[str, Any]]]:
    """The `volumes:`/`volumeMounts:` example lines values.yaml's comments give under `section`."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    start = lines.index(f"{section}:")
    end = next(i for i in range(start + 1, len(lines)) if lines[i] and not lines[i].startswith((" ", "#")))
    out: dict[str, list[dict[str, Any]]] = {}
    for line in lines[start:end]:
        text = line.strip()
        if text.startswith("#") and text.lstrip("# ").startswith(("volumes: [", "volumeMounts: [")):
            out.update(yaml.safe_load(text.lstrip("# ")))
    return out


def test_no_volumes_by_default() -> None:
    docs = render(merge(EXTERNAL_NATS, {"bridges": {"targets": [VLLM_TARGET]}}))
    for doc in find(docs, "Deployment") + find(docs, "StatefulSet"):
        assert "volumes" not in doc["spec"]["template"]["spec"], doc["metadata"]["name"]
        assert "volumeMounts" not in container(doc), doc["metadata"]["name"]


def test_volumes_reach_every_pod_and_the_gateway_can_load_the_tokenizers() -> None:
    models = {"volumes": [MODELS_VOLUME], "volumeMounts": [MODELS_MOUNT]}
    sockets = {
        "volumes": [{"name": "zmq", "emptyDir": {}}],
        "volumeMounts": [{"name": "zmq", "mountPath": "/run/zmq"}],
    }
    values = merge(
        EXTERNAL_NATS,
        {
            # routerConfig brings the chart's own volume: the user's join it, not replace it.
            "gateway": {"routerConfig": {"session_admission": True}, **models},
            "workers": {"engine": "torch", "modelPath": "/models/llama", **models},
            "bridges": {"targets": [VLLM_TARGET], **sockets},
        },
    )
    docs = render(values)
    validate_all(docs)
    (gateway,) = find(docs, "Deployment", "gateway")
    (workers,) = find(docs, "StatefulSet", "worker")
    (bridge,) = find(docs, "Deployment", "bridge")
    assert set(pod_volumes(gateway)) == {"router-config", "models"}
    assert pod_volumes(workers) == {"models": MODELS_VOLUME}
    assert pod_volumes(bridge) == {"zmq": {"name": "zmq", "emptyDir": {}}}
    assert MODELS_MOUNT in container(gateway)["volumeMounts"] and mounted(gateway, "/etc/kvgate/router.json")
    assert mounted(bridge, "/run/zmq/kv.sock")

    wk = container(workers)
    assert flag(wk["args"], "--model-path") == "/models/llama"
    check_cli(wk["args"], "worker")
    assert mounted(workers, "/models/llama/config.json")
    # The bridge pod does not mount the models here, so it registers its tokenizer by path and the
    # gateway loads it from the same path (a torch worker stores its own on the bus).
    tokenizer = flag(container(bridge)["args"], "--tokenizer")
    assert tokenizer == "/models/llama/tokenizer.json"
    assert mounted(gateway, tokenizer)
    text = notes(values)
    assert "WARNING" not in text
    assert '"model": "llama"' in text  # the torch engine serves the checkpoint folder's name


def test_an_unmounted_tokenizer_is_called_out() -> None:
    values = merge(
        EXTERNAL_NATS,
        {
            "workers": {"engine": "torch", "modelPath": "/weights/qwen/"},
            "bridges": {"targets": [VLLM_TARGET]},
        },
    )
    text = notes(values)
    assert "/weights/qwen" not in text  # a torch worker stores its checkpoint's tokenizer on the bus
    assert "the gateway loads /models/llama/tokenizer.json" in text
    mounts = {"volumes": [MODELS_VOLUME], "volumeMounts": [MODELS_MOUNT]}
    for section in ("gateway", "bridges"):  # the bridge stores it on the bus, or the gateway reads it
        assert "/models/llama/tokenizer.json" not in notes(merge(values, {section: mounts}))


@pytest.mark.parametrize("section", ["gateway", "workers"])
def test_documented_volume_examples_render_valid_pods(section: str) -> None:
    example = documented_examples(section)
    assert set(example) == {"volumes", "volumeMounts"}
    kind = "StatefulSet" if section == "workers" else "Deployment"
    docs = render(merge(EXTERNAL_NATS, {section: example}))
    validate_all(docs)
    (doc,) = find(docs, kind, section.removesuffix("s"))
    assert mounted(doc, "/models/llama/tokenizer.json")


# --- bad values get clear errors


def test_external_nats_url_is_required_without_the_subchart() -> None:
    with pytest.raises(helm.HelmError, match=r"externalNats\.url is required"):
        render({"nats": {"enabled": False}})


@pytest.mark.parametrize(
    "bad",
    [
        {"workers": {"engine": "tensorrt"}},
        {"gateway": {"policy": "fastest"}},
        {"busNamespace": "has.dots"},
        {"gateway": {"replicaz": 2}},
        {"bridges": {"targets": [{"name": "Bad_Name", "url": "http://x", "zmq": "tcp://x:1", "model": "m"}]}},
        {"bridges": {"targets": [{"name": "v", "url": "http://x", "model": "m"}]}},
        {"gateway": {"volumes": {"name": "models"}}},  # a list, not one volume
        {"gateway": {"volumes": [{"hostPath": {"path": "/models"}}]}},  # no name
        {"workers": {"volumes": [{"name": "Models_1", "emptyDir": {}}]}},  # not a DNS label
        {"workers": {"volumeMounts": [{"name": "models"}]}},  # no mountPath
        {"bridges": {"volumeMounts": [{"name": "models", "mountPath": "models"}]}},  # relative
        {"workers": {"modelPath": "/models/llama"}},  # the mock engine loads no checkpoint
        {"workers": {"engine": "torch", "modelPath": "models/llama"}},  # relative to an unknown cwd
    ],
)
def test_schema_rejects_bad_values(bad: dict[str, Any]) -> None:
    with helm.Chart.load(CHART) as chart, pytest.raises(helm.HelmValuesError):
        chart.validate_schema(chart.merge_values(merge(EXTERNAL_NATS, bad)))


def test_schema_choices_follow_the_code() -> None:
    """The schema's policy and engine lists are the ones the gateway and the worker accept."""
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]
    assert sorted(schema["gateway"]["properties"]["policy"]["enum"]) == sorted(POLICIES)
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    engine_flag = next(a for a in commands["worker"]._actions if "--engine" in a.option_strings)
    assert sorted(schema["workers"]["properties"]["engine"]["enum"]) == sorted(engine_flag.choices)
    bridge_flag = next(a for a in commands["bridge"]._actions if "--engine" in a.option_strings)
    targets = schema["bridges"]["properties"]["targets"]["items"]["properties"]
    assert sorted(targets["engine"]["enum"]) == sorted(bridge_flag.choices)


def bus_secret(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str], list[dict[str, Any]]]:
    """The chart's bus Secret: the document, its data decoded, and the bundled NATS's users from it."""
    (secret,) = find(render(values), "Secret")
    data = {key: base64.b64decode(value).decode() for key, value in secret["data"].items()}
    users_conf = data["nats-users.conf"]
    assert users_conf.startswith("users: ")
    return secret, data, json.loads(users_conf.removeprefix("users: "))


def test_each_role_has_its_own_bus_user_with_kvgate_ups_permissions() -> None:
    """The gateway, the workers' pods and each bridge authenticate as their own user with the password
    from the chart's Secret; the bundled NATS's users carry bcrypt hashes of those passwords and exactly
    the permissions `kvgate up` gives the same roles (gateway/bus_roles.py): the workers' user may write
    its pods' worker ids only, each bridge's user its own only."""
    from gateway.bus_roles import gateway_permissions, worker_permissions
    from router.protocol import Subjects

    values = {"busNamespace": "team-a", "workers": {"replicas": 3}, "bridges": {"targets": BRIDGE_TARGETS}}
    docs = render(values)
    secret, data, users = bus_secret(values)
    bridges = [target["name"] for target in BRIDGE_TARGETS]
    roles = ["gateway", "worker", *(f"bridge-{name}" for name in bridges)]
    assert set(data) == {f"{role}-password" for role in roles} | {"nats-users.conf"}
    pods = {"Deployment/demo-kvgate-gateway": "gateway", "StatefulSet/demo-kvgate-worker": "worker"}
    pods.update({f"Deployment/demo-kvgate-bridge-{name}": f"bridge-{name}" for name in bridges})
    for doc in docs:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        env = {e["name"]: e for e in container(doc).get("env", [])}
        role = pods.pop(f"{doc['kind']}/{doc['metadata']['name']}")
        assert env["NATS_USER"]["value"] == role
        ref = env["NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": secret["metadata"]["name"], "key": f"{role}-password"}
    assert not pods

    subjects = Subjects("team-a")
    expected = {
        "gateway": gateway_permissions(subjects),
        "worker": worker_permissions(subjects, [f"demo-kvgate-worker-{i}" for i in range(3)]),
        **{f"bridge-{name}": worker_permissions(subjects, [name]) for name in bridges},
    }
    for user in users:
        assert user["permissions"] == expected.pop(user["user"]), user["user"]
        # the bundled NATS gets the hash, never the password itself
        assert bcrypt.checkpw(data[f"{user['user']}-password"].encode(), user["password"].encode())
    assert not expected


def test_the_bundled_nats_reads_the_users_from_the_secret() -> None:
    """The nats chart's values include the Secret's user list, mounted beside its configuration, and
    nothing else of the Secret (no password reaches the NATS pod)."""
    nats = values_file("values.yaml")["nats"]
    assert nats["config"]["merge"]["authorization"] == {"$include": "../nats-auth/users.conf"}
    (mount,) = [p["value"] for p in nats["container"]["patch"] if p["path"] == "/volumeMounts/-"]
    (volume,) = [p["value"] for p in nats["podTemplate"]["patch"] if p["path"] == "/spec/volumes/-"]
    assert mount == {"name": volume["name"], "mountPath": "/etc/nats-auth", "readOnly": True}
    # the nats chart's configuration lives in /etc/nats-config: the include resolves beside it
    assert os.path.normpath("/etc/nats-config/../nats-auth/users.conf") == "/etc/nats-auth/users.conf"
    secret_name = values_file("values.yaml")["busAuth"]["secretName"]
    items = [{"key": "nats-users.conf", "path": "users.conf"}]
    assert volume["secret"] == {"secretName": secret_name, "items": items}


def test_the_bundled_nats_admits_each_role_to_its_own_subjects_only(tmp_path: Path) -> None:
    """A real nats-server given what the chart gives the bundled one (its configuration including the
    Secret's nats-users.conf from beside it) admits each pod's password, refuses a wrong one, logs no
    warning about plaintext passwords, and drops what a worker or a bridge publishes as another."""
    values = {"workers": {"replicas": 2}, "bridges": {"targets": BRIDGE_TARGETS[:1]}}
    _, data, _ = bus_secret(values)
    port = free_port()
    (tmp_path / "nats-config").mkdir()
    (tmp_path / "nats-auth").mkdir()
    (tmp_path / "nats-auth" / "users.conf").write_text(data["nats-users.conf"])
    # the nats chart writes `$include: X` as nats-server's `include X;`
    config = f"host: 127.0.0.1\nport: {port}\nauthorization {{\n  include ../nats-auth/users.conf;\n}}\n"
    (tmp_path / "nats-config" / "nats.conf").write_text(config)
    log = tmp_path / "nats.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [find_nats_server(), "-c", str(tmp_path / "nats-config" / "nats.conf")], stderr=out
        )
    try:
        deadline = time.monotonic() + 30
        while "Server is ready" not in log.read_text():
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert "Plaintext" not in log.read_text()
        asyncio.run(_publish_as_each_role(f"nats://127.0.0.1:{port}", data))
    finally:
        server.terminate()
        server.wait(10)


async def _publish_as_each_role(url: str, data: dict[str, str]) -> None:
    options = {"allow_reconnect": False, "connect_timeout": 10}

    async def connect(user: str, password: str) -> Any:
        return await nats_connect(url, user=user, password=password, **options)

    with pytest.raises(Exception, match=r"(?i)authorization"):
        await connect("worker", data["gateway-password"])
    gateway = await connect("gateway", data["gateway-password"])
    seen: list[str] = []

    async def on_event(msg: Any) -> None:
        seen.append(msg.subject)

    await gateway.subscribe("kvgate.kvgate.kv.>", cb=on_event)
    await gateway.flush()
    bridge = "bridge-vllm-0"
    # each publishes as someone else first, then as itself: a connection's messages arrive in order,
    # so once its own arrived, the other would have too had the server let it through
    attempts = {
        "worker": ("kvgate.kvgate.kv.vllm-0", "kvgate.kvgate.kv.demo-kvgate-worker-1"),
        bridge: ("kvgate.kvgate.kv.demo-kvgate-worker-0", "kvgate.kvgate.kv.vllm-0"),
    }
    for user, (forbidden, own) in attempts.items():
        client = await connect(user, data[f"{user}-password"])
        await client.publish(forbidden, b"x")
        await client.publish(own, b"x")
        await client.flush()
        await client.close()
    async with asyncio.timeout(30):
        while len(seen) < 2:
            await asyncio.sleep(0.05)
    assert seen == ["kvgate.kvgate.kv.demo-kvgate-worker-1", "kvgate.kvgate.kv.vllm-0"]
    await gateway.close()


BUNDLED_NATS_WITHOUT_USERS = {
    "config": {"merge": {"authorization": None}},
    "container": {"patch": []},
    "podTemplate": {"patch": []},
}


def test_bus_auth_can_be_turned_off() -> None:
    docs = render({"busAuth": {"enabled": False}, "nats": BUNDLED_NATS_WITHOUT_USERS})
    assert not find(docs, "Secret")
    (gateway,) = find(docs, "Deployment")
    env = gateway["spec"]["template"]["spec"]["containers"][0].get("env", [])
    assert "NATS_PASSWORD" not in {e["name"] for e in env}


def test_bus_auth_off_with_the_bundled_nats_still_reading_its_users_is_refused() -> None:
    """The bundled NATS would wait for a users file from a Secret nobody makes: one clear error instead."""
    with pytest.raises(helm.HelmError, match=r"also set nats\.config\.merge\.authorization=null"):
        render({"busAuth": {"enabled": False}})
    render({"busAuth": {"enabled": False}, **EXTERNAL_NATS})  # an external NATS: its users are yours


def test_tracing_values_reach_the_gateway_and_the_workers() -> None:
    def otel_env(docs: list[dict]) -> dict[str, dict[str, str]]:
        out = {}
        for doc in docs:
            if doc["kind"] in ("Deployment", "StatefulSet"):
                (container,) = doc["spec"]["template"]["spec"]["containers"]
                env = container.get("env", [])
                out[doc["kind"]] = {e["name"]: e["value"] for e in env if e["name"].startswith("OTEL_")}
        return out

    assert otel_env(render({})) == {"Deployment": {}, "StatefulSet": {}}  # off by default
    endpoint = "http://otel-collector.observability:4318"
    sampler = {"sampler": "parentbased_traceidratio", "samplerArg": "0.1"}
    tracing = {"tracing": {"otlpEndpoint": endpoint, **sampler}}
    env = otel_env(render({**tracing, "busAuth": {"enabled": False}, "nats": BUNDLED_NATS_WITHOUT_USERS}))
    for kind, service in (("Deployment", "kvgate-gateway"), ("StatefulSet", "kvgate-worker")):
        assert env[kind] == {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_SERVICE_NAME": service,
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0.1",
        }
