"""An engine's load from its Prometheus /metrics page (vLLM's or SGLang's gauge and counter names)."""

from __future__ import annotations

import contextlib

import msgspec
from prometheus_client.parser import text_string_to_metric_families

# Gauges, vLLM names first, then SGLang's.
_RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
_WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")
_PROMPT_TOKENS = ("vllm:prompt_tokens", "sglang:prompt_tokens")
_GENERATION_TOKENS = ("vllm:generation_tokens", "sglang:generation_tokens")
_CACHE_INFO = "vllm:cache_config_info"
USAGE_SCALE = 10_000  # used/total blocks when the engine does not tell its block count


class EngineMetrics(msgspec.Struct, frozen=True):
    running: int
    waiting: int
    kv_usage: float  # 0..1
    prompt_tokens: float  # counters, for rates between two scrapes
    generation_tokens: float
    num_blocks: int  # 0 when unknown
    started_at: float = 0.0  # process_start_time_seconds (0 when absent): a change means a restart


def parse_metrics(text: str) -> EngineMetrics:
    """The load gauges of a vLLM or SGLang /metrics page (summed over engines and models)."""
    sums: dict[str, float] = {}
    num_blocks = 0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == _CACHE_INFO:
                with contextlib.suppress(KeyError, ValueError):
                    num_blocks = max(num_blocks, int(sample.labels["num_gpu_blocks"]))
                continue
            name = sample.name.removesuffix("_total")
            if family.type == "counter" and sample.name.endswith("_created"):
                continue
            sums[name] = sums.get(name, 0.0) + sample.value

    def first(names: tuple[str, ...]) -> float:
        return next((sums[n] for n in names if n in sums), 0.0)

    return EngineMetrics(
        running=int(first(_RUNNING)),
        waiting=int(first(_WAITING)),
        kv_usage=min(1.0, max(0.0, first(_KV_USAGE))),
        prompt_tokens=first(_PROMPT_TOKENS),
        generation_tokens=first(_GENERATION_TOKENS),
        num_blocks=num_blocks,
        started_at=sums.get("process_start_time_seconds", 0.0),
    )
