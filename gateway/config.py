"""The gateway's settings: one frozen struct, built from the command line (gateway.serve)."""

from __future__ import annotations

import msgspec

from kvutil.bus_auth import BusAuth
from router.config import RouterConfig


class GatewayConfig(msgspec.Struct, frozen=True):
    nats_url: str
    bus_auth: BusAuth = msgspec.field(default_factory=BusAuth)
    namespace: str = "kvgate"
    policy: str = "session_kv"
    api_keys: tuple[str, ...] = ()
    tenants: tuple[tuple[str, str], ...] = ()  # (tenant name, key): keys of one name share a tenant
    metrics_key: str | None = None  # required on /metrics when set
    ready_key: str | None = None  # required on /ready when set
    max_body_bytes: int = 8 * 1024 * 1024
    body_budget_bytes: int = 256 * 1024 * 1024  # request bodies being read at once (kvutil/body_budget.py)
    body_timeout_s: float = 60.0  # a body's time to arrive once its head has
    max_prompt_tokens: int = 131_072
    max_inflight_per_worker: int = 0  # 0: the worker's own max_num_seqs
    queue_bound: int = 256
    queue_timeout_s: float = 30.0
    header_timeout_s: float = 10.0  # a connection's time to send a request head (slowloris)
    prompt_cache_bytes: int = 64 << 20  # sessions' last prompts, and each tokenizer's segment cache
    retry_after_s: int = 1
    max_attempts: int = 3
    connect_timeout_s: float = 2.0
    # a worker silent this long mid-answer is hung; a kvgate worker holding a request that has no token
    # to send (queued behind a jam, preempted) sends an SSE keepalive every 15 s (engines/loop.py)
    read_timeout_s: float = 120.0
    first_byte_timeout_s: float = 20.0  # a streamed answer's head: a hung worker is retried elsewhere
    failure_backoff_s: float = 5.0  # a worker that failed an attempt is left out of picks this long
    stale_after_s: float = 3.0
    gateway_id: str = "gateway"
    snapshot_interval_s: float = 30.0  # index snapshots for new replicas (taken by one replica in turn)
    router_config: RouterConfig = msgspec.field(default_factory=RouterConfig)  # the routing tunables
    strip_anthropic_billing: bool = True  # drop Claude Code's per-request line from system prompts
    responses_ttl_s: float = 3600.0  # how long /v1/responses keeps a response for previous_response_id
    # send a turn as its prompt and then its decode where the router asks (session_kv on workers that
    # schedule by priority and return token ids: gateway/split_turn.py); off: one request a turn
    split_turns: bool = True
