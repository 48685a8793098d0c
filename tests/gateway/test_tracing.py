"""OpenTelemetry end to end: `kvgate up` with OTEL_EXPORTER_OTLP_ENDPOINT pointing at an OTLP/HTTP
receiver started here (protobuf decoded with opentelemetry-proto); one request's trace holds the
gateway's server span (GenAI and routing attributes), its admission and upstream children, and the
worker's server span with its queue, prefill and decode children, all under the client's trace id."""

from __future__ import annotations

import asyncio
import gzip
import os
import sys
import time
from pathlib import Path
from typing import Any

import openai
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

from gateway.natsd import free_port
from kvutil.tracing import tracing_enabled
from tests.serving import serving

pytestmark = pytest.mark.slow

CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"


def value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


class Receiver:
    """An OTLP/HTTP trace receiver: every span it got, with its service name."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []

    async def traces(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("content-encoding") == "gzip":
            body = gzip.decompress(body)
        export = ExportTraceServiceRequest()
        export.ParseFromString(body)
        for resource_spans in export.resource_spans:
            resource = {a.key: value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        {
                            "service": resource.get("service.name"),
                            "name": span.name,
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent": span.parent_span_id.hex(),
                            "kind": span.kind,
                            "start": span.start_time_unix_nano,
                            "end": span.end_time_unix_nano,
                            "attributes": {a.key: value(a.value) for a in span.attributes},
                        }
                    )
        reply = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")


def test_tracing_is_off_without_an_endpoint() -> None:
    assert not tracing_enabled({})
    assert tracing_enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"})
    assert not tracing_enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"})
    assert not tracing_enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_TRACES_EXPORTER": "none"})


async def test_one_trace_from_the_gateway_to_the_worker(tmp_path: Path) -> None:
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", receiver.traces)
    port = free_port()
    async with serving(app) as otlp_url:
        env = {
            **os.environ,
            "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_url,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        env.pop("OTEL_SERVICE_NAME", None)
        log = (tmp_path / "up.log").open("wb")
        up = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gateway.cli", "up", "--engine", "mock", "--workers", "2",
            "--port", str(port), "--worker-args", "--speedup 1000",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=log, start_new_session=True,
        )  # fmt: skip
        try:
            assert up.stdout is not None
            banner = ""
            while "curl" not in banner:
                line = (await asyncio.wait_for(up.stdout.readline(), 90)).decode()
                assert line, (tmp_path / "up.log").read_text()[-3000:]
                banner += line
            model = banner.split('"model": "')[1].split('"')[0]
            sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
            reply = await sdk.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "Hello!"}],
                max_tokens=3,
                extra_headers={
                    "traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01",
                    "x-session-affinity": "s7",
                },
            )
            await sdk.close()

            deadline = time.monotonic() + 30
            while True:
                trace = [s for s in receiver.spans if s["trace_id"] == CLIENT_TRACE]
                names = {s["name"] for s in trace}
                if {"kvgate.worker.decode", f"chat {model}", "kvgate.admission"} <= names and len(trace) >= 7:
                    break
                seen = [(s["service"], s["name"], s["trace_id"]) for s in receiver.spans]
                assert time.monotonic() < deadline, seen
                await asyncio.sleep(0.2)
        finally:
            up.terminate()
            await asyncio.wait_for(up.wait(), 30)

    by_service: dict[str, list[dict[str, Any]]] = {}
    for span in trace:
        by_service.setdefault(span["service"], []).append(span)
    (gateway,) = [s for s in by_service["kvgate-gateway"] if s["parent"] == CLIENT_SPAN]
    attrs = gateway["attributes"]
    assert gateway["name"] == f"chat {model}" and gateway["kind"] == 2  # SERVER
    assert attrs["gen_ai.operation.name"] == "chat" and attrs["gen_ai.request.model"] == model
    assert attrs["gen_ai.conversation.id"] == "s7" and attrs["kvgate.route.policy"] == "session_kv"
    assert attrs["gen_ai.usage.input_tokens"] > 0
    assert attrs["gen_ai.usage.output_tokens"] == reply.usage.completion_tokens
    assert attrs["gen_ai.response.finish_reasons"] == [reply.choices[0].finish_reason]
    assert attrs["kvgate.route.reason"] and "kvgate.route.expected_cached_tokens" in attrs
    children = {s["name"]: s for s in by_service["kvgate-gateway"] if s["parent"] == gateway["span_id"]}
    assert set(children) == {"kvgate.admission", "POST /v1/chat/completions"}
    upstream = children["POST /v1/chat/completions"]

    (worker,) = [s for s in by_service["kvgate-worker"] if s["parent"] == upstream["span_id"]]
    assert worker["attributes"]["kvgate.request_id"].startswith(attrs["kvgate.route.request_id"])
    phases = {s["name"]: s for s in by_service["kvgate-worker"] if s["parent"] == worker["span_id"]}
    assert set(phases) == {"kvgate.worker.queue", "kvgate.worker.prefill", "kvgate.worker.decode"}
    queue, prefill, decode = (phases[f"kvgate.worker.{p}"] for p in ("queue", "prefill", "decode"))
    assert worker["start"] == queue["start"] <= queue["end"] == prefill["start"] <= prefill["end"]
    assert prefill["end"] == decode["start"] <= decode["end"] == worker["end"]
    assert upstream["start"] <= worker["start"] and worker["end"] <= upstream["end"] + 50_000_000
