"""The chart in charts/kvgate rendered by the real Helm library (helm-python-sdk wraps Helm's Go SDK),
with the values the tests share, and the rendered manifests looked up and validated against the
Kubernetes OpenAPI schemas (kubernetes-validate)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "kvgate"
KUBE_VERSION = "1.30"
EXTERNAL_NATS = {"nats": {"enabled": False}, "externalNats": {"url": "nats://nats.infra:4222"}}

# Two bridged engines as values.yaml documents them (a vLLM pod with a replay endpoint and a tokenizer the
# gateway loads, an SGLang pod with its 1-token blocks)
BRIDGE_TARGETS: list[dict[str, Any]] = [
    {
        "name": "vllm-0",
        "engine": "vllm",
        "url": "http://vllm-0.vllm:8000",
        "zmq": "tcp://vllm-0.vllm:5557",
        "replay": "tcp://vllm-0.vllm:5558",
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "blockSize": 16,
        "tokenizer": "/models/llama/tokenizer.json",
    },
    {
        "name": "sglang-0",
        "engine": "sglang",
        "url": "http://sglang-0.sglang:30000",
        "zmq": "tcp://sglang-0.sglang:5557",
        "model": "Qwen/Qwen2.5-7B-Instruct",
        "blockSize": 1,
    },
]


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Helm's coalescing of a values file over another: maps merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def values_file(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / name).read_text())


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.merge_values(values))
        manifests = chart.render(values, name="demo", namespace="llm", is_install=True)
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return docs


def notes(values: dict[str, Any]) -> str:
    with helm.Chart.load(CHART) as chart:
        return chart.render(values, name="demo", namespace="llm")["kvgate/templates/NOTES.txt"]


def validate_all(docs: list[dict[str, Any]]) -> None:
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: kubernetes-validate has no schema for it; checked on its own below
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def find(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> list[dict[str, Any]]:
    return [
        d
        for d in docs
        if d["kind"] == kind
        and (component is None or d["metadata"]["labels"].get("app.kubernetes.io/component") == component)
    ]


def container(doc: dict[str, Any]) -> dict[str, Any]:
    (only,) = doc["spec"]["template"]["spec"]["containers"]
    return only


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
