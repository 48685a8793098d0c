"""`kvgate gateway`: the routing gateway against a NATS bus (uvloop when installed)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import math
import signal
import sys
import uuid
from collections.abc import Sequence
from difflib import get_close_matches
from typing import Any

import msgspec
from aiohttp import web

from gateway.app import Gateway
from gateway.config import GatewayConfig
from gateway.http_server import DEFAULT_HEADER_TIMEOUT_S, GatewayRunner
from kvutil.bus_auth import BusAuthError, add_bus_arguments, bus_auth_from, nats_url_from, redact_url
from router.config import RouterConfig
from router.policies import POLICIES

log = logging.getLogger("kvgate.gateway")

MAX_ROUTER_CONFIG_BYTES = 1 << 20  # a JSON object of a few dozen tunables; anything near this is a wrong file
DEFAULT_WORKER_STALE_AFTER_S = 3.0  # three missed heartbeats (workers send one a second)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats", default=None, help="NATS URL, e.g. nats://127.0.0.1:4222 [NATS_URL]")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--policy", default="session_kv", choices=sorted(POLICIES), help="routing policy")
    parser.add_argument("--namespace", default="kvgate", help="bus namespace shared with the workers")
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        dest="api_keys",
        help="accept only requests bearing this key (repeatable); each key is a tenant of its own, its "
        "cache and sessions apart from the others'",
    )
    parser.add_argument(
        "--tenant",
        action="append",
        default=[],
        metavar="NAME=KEY",
        help="accept KEY too, as tenant NAME: the keys of one NAME share its cache and sessions (repeatable)",
    )
    parser.add_argument("--metrics-key", default=None, help="require this bearer key on /metrics")
    parser.add_argument("--ready-key", default=None, help="require this bearer key on /ready")
    parser.add_argument(
        "--max-body-bytes", type=int, default=8 * 1024 * 1024, help="larger request bodies get 413"
    )
    parser.add_argument(
        "--max-prompt-tokens", type=int, default=131_072, help="longer prompts get 400 before routing"
    )
    parser.add_argument(
        "--max-inflight-per-worker",
        type=int,
        default=0,
        help="in-flight requests per worker before queueing (0: the worker's max_num_seqs)",
    )
    parser.add_argument("--queue-bound", type=int, default=256, help="queued requests beyond which 429")
    parser.add_argument(
        "--prompt-cache-mb",
        type=float,
        default=64.0,
        help="memory for the sessions' last prompts, and again for each tokenizer's segment cache (MiB); "
        "the session table's is --router-set max_session_bytes=N",
    )
    parser.add_argument(
        "--first-byte-timeout-s",
        type=float,
        default=20.0,
        help="seconds a worker has to start a streamed answer before the turn is retried elsewhere",
    )
    parser.add_argument(
        "--failure-backoff-s",
        type=float,
        default=5.0,
        help="seconds a worker that failed an attempt (refused, 5xx, no first byte) is left out of picks",
    )
    parser.add_argument(
        "--header-timeout-s",
        type=float,
        default=DEFAULT_HEADER_TIMEOUT_S,
        help="seconds a connection has to send a request's headers (also the idle keep-alive limit)",
    )
    parser.add_argument(
        "--snapshot-interval-s",
        type=float,
        default=30.0,
        help="seconds between index snapshots in the NATS object store (replicas take turns)",
    )
    parser.add_argument(
        "--keep-anthropic-billing-line",
        action="store_true",
        help="keep Claude Code's per-request billing line in /v1/messages system prompts (else removed)",
    )
    parser.add_argument(
        "--responses-ttl",
        type=float,
        default=3600.0,
        help="seconds a /v1/responses response can be continued by previous_response_id",
    )
    add_router_arguments(parser)
    add_bus_arguments(parser)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")


def add_router_arguments(parser: argparse.ArgumentParser) -> None:
    """The router's tunables (router/config.py `RouterConfig`) and its workers' staleness; `kvgate up`
    takes them too."""
    parser.add_argument(
        "--worker-stale-after-s",
        type=float,
        default=DEFAULT_WORKER_STALE_AFTER_S,
        help="seconds without a worker's heartbeat (one a second) before it leaves the pick with its "
        "blocks; raise it where a loaded host can stall a live worker's heartbeat",
    )
    parser.add_argument(
        "--router-config",
        metavar="FILE",
        help='JSON object of RouterConfig fields (router/config.py), e.g. {"session_admission": true}',
    )
    parser.add_argument(
        "--router-set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="one RouterConfig field over --router-config, VALUE as JSON (repeatable), e.g. stall_factor=1.5",
    )


class SettingError(Exception):
    """A command-line setting the gateway cannot use; the message is one line naming it."""


class RouterConfigError(SettingError):
    """A router config file or override (or a tenant) the gateway cannot use."""


def load_router_config(path: str | None, overrides: Sequence[str] = ()) -> RouterConfig:
    """The file's fields, then each KEY=VALUE over them; every step checked as RouterConfig checks it,
    so an error names the file or the override that made it."""
    config, fields = RouterConfig(), {}
    if path is not None:
        fields = _read_object(path)
        config = _to_config(fields, f"--router-config {path}")
    for item in overrides:
        key, value = _parse_override(item)
        fields = {**fields, key: value}
        config = _to_config(fields, f"--router-set {item}")
    return config


def router_config_from(args: argparse.Namespace) -> RouterConfig:
    return load_router_config(args.router_config, args.router_set)


def worker_stale_after_s(args: argparse.Namespace) -> float:
    """--worker-stale-after-s, checked: a positive, finite number of seconds."""
    check_numbers(args, positive=["worker_stale_after_s"])
    value: float = args.worker_stale_after_s
    return value


def check_numbers(
    args: argparse.Namespace, positive: Sequence[str] = (), not_negative: Sequence[str] = ()
) -> None:
    """SettingError naming the first of these flags (by their `args` names) whose number is not finite,
    or not above 0 (`positive`), or below 0 (`not_negative`)."""
    for name in [*positive, *not_negative]:
        value = getattr(args, name)
        strict = name in positive
        if not math.isfinite(value) or value < 0 or (strict and value == 0):
            what = "a positive number" if strict else "at least 0"
            raise SettingError(f"--{name.replace('_', '-')} must be {what}, not {value}")


def _read_object(path: str) -> dict[str, Any]:
    where = f"--router-config {path}"
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_ROUTER_CONFIG_BYTES + 1)
    except OSError as exc:
        raise RouterConfigError(f"{where}: {exc.strerror or exc}") from None
    if len(data) > MAX_ROUTER_CONFIG_BYTES:
        raise RouterConfigError(f"{where}: larger than {MAX_ROUTER_CONFIG_BYTES} bytes")
    try:
        fields = msgspec.json.decode(data)
    except msgspec.DecodeError as exc:
        raise RouterConfigError(f"{where}: not JSON: {exc}") from None
    if not isinstance(fields, dict):
        raise RouterConfigError(f"{where}: expected a JSON object of RouterConfig fields")
    return fields


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise RouterConfigError(f"--router-set {item}: expected KEY=VALUE, e.g. session_admission=true")
    try:
        return key.strip(), msgspec.json.decode(text)
    except msgspec.DecodeError:
        raise RouterConfigError(f"--router-set {item}: VALUE must be JSON (true, 1.5, 64)") from None


def _to_config(fields: dict[str, Any], where: str) -> RouterConfig:
    # RouterConfig ignores unknown fields when decoding; a typo must not silently keep the default.
    for key in fields:
        if key not in RouterConfig.__struct_fields__:
            close = get_close_matches(key, RouterConfig.__struct_fields__, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RouterConfigError(f"{where}: unknown field {key!r}{hint}")
    try:
        return msgspec.convert(fields, RouterConfig)  # types as JSON decoding checks them, then __post_init__
    except msgspec.ValidationError as exc:
        raise RouterConfigError(f"{where}: {exc}") from None


def _tenant(item: str) -> tuple[str, str]:
    name, sep, key = item.partition("=")
    if not sep or not name or not key:
        raise RouterConfigError(f"--tenant expects NAME=KEY (got {len(item)} characters without one)")
    return name, key


def describe_router_config(config: RouterConfig) -> str:
    """The fields that differ from the defaults, as KEY=JSON, for the start-up log."""
    default = RouterConfig()
    changed = [
        f"{name}={msgspec.json.encode(getattr(config, name)).decode()}"
        for name in RouterConfig.__struct_fields__
        if getattr(config, name) != getattr(default, name)
    ]
    return " ".join(changed) if changed else "all defaults"


# the numeric flags of `kvgate gateway`, as `check_numbers` takes them (--worker-stale-after-s apart)
POSITIVE_FLAGS = (
    "max_body_bytes", "max_prompt_tokens", "first_byte_timeout_s", "header_timeout_s", "snapshot_interval_s",
    "responses_ttl",
)  # fmt: skip
NOT_NEGATIVE_FLAGS = ("max_inflight_per_worker", "queue_bound", "prompt_cache_mb", "failure_backoff_s")


def config_from(args: argparse.Namespace, router_config: RouterConfig) -> GatewayConfig:
    """The gateway's settings from its command line; SettingError for one it cannot use."""
    check_numbers(args, POSITIVE_FLAGS, NOT_NEGATIVE_FLAGS)
    named = tuple(_tenant(item) for item in args.tenant)
    return GatewayConfig(
        nats_url=args.nats,
        bus_auth=bus_auth_from(args),
        namespace=args.namespace,
        policy=args.policy,
        api_keys=tuple(args.api_keys) + tuple(key for _, key in named),
        tenants=named,
        metrics_key=args.metrics_key,
        ready_key=args.ready_key,
        max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        max_inflight_per_worker=args.max_inflight_per_worker,
        queue_bound=args.queue_bound,
        header_timeout_s=args.header_timeout_s,
        first_byte_timeout_s=args.first_byte_timeout_s,
        failure_backoff_s=args.failure_backoff_s,
        prompt_cache_bytes=max(1, int(args.prompt_cache_mb * 2**20)),
        stale_after_s=worker_stale_after_s(args),
        snapshot_interval_s=args.snapshot_interval_s,
        gateway_id=f"gateway-{uuid.uuid4().hex[:8]}",
        router_config=router_config,
        strip_anthropic_billing=not args.keep_anthropic_billing_line,
        responses_ttl_s=args.responses_ttl,
    )


async def serve(config: GatewayConfig, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve until `stop` is set; logs the URL once listening."""
    gateway = Gateway(config)
    log.info("router settings: %s", describe_router_config(config.router_config))
    if config.router_config.session_admission and gateway.router.admission is None:
        log.warning("session_admission is ignored: only session_kv admits by session, not %s", config.policy)
    runner = GatewayRunner(
        gateway.app(),
        header_timeout_s=config.header_timeout_s,
        on_refused=lambda status: gateway.metrics.count_request("other", status),
        handler_cancellation=True,
        access_log=None,
        direct=gateway.direct_routes(),
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        log.info(
            "gateway listening on http://%s:%d (policy %s, namespace %s, NATS %s)",
            host,
            port,
            config.policy,
            config.namespace,
            redact_url(config.nats_url),
        )
        await stop.wait()
    finally:
        await runner.cleanup()


def install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


# A routed request holds ~100 tracked objects while in flight, so at the default threshold (700) a
# few dozen concurrent requests set off a young collection every few dozen requests, each ~1 ms here:
# ~15 % of the gateway's CPU on `kvgate bench gateway` (docs/EXPERIMENTS.md, "Gateway CPU, third
# pass"). With a young generation larger than the requests in flight hold, collections follow the
# heap's growth instead. Cyclic garbage waits a little longer; it is rare (requests free by refcount).
YOUNG_GC_THRESHOLD = 20_000


def tune_gc_for_serving() -> None:
    """For a serving process, once its modules are imported: those objects are never garbage, so they
    leave the collector's view (`gc.freeze`), and young collections run less often."""
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_GC_THRESHOLD, older, oldest)


def run(args: argparse.Namespace) -> int:
    args.nats = nats_url_from(args.nats)
    if args.nats is None:
        print("kvgate gateway: --nats (or NATS_URL) is required", file=sys.stderr)
        return 2
    try:
        config = config_from(args, router_config_from(args))
    except (SettingError, BusAuthError) as exc:
        print(f"kvgate gateway: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    install_uvloop()
    tune_gc_for_serving()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, args.host, args.port, stop)

    try:
        asyncio.run(main())
    except OSError as exc:  # the port is taken, or the address is not this host's
        reason = exc.strerror or exc
        print(f"kvgate gateway: cannot listen on {args.host}:{args.port}: {reason}", file=sys.stderr)
        return 1
    return 0
