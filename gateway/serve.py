"""`kvgate gateway`: the routing gateway against a NATS bus (uvloop when installed)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
import uuid

from aiohttp import web

from gateway.app import Gateway
from gateway.config import GatewayConfig
from gateway.http_server import DEFAULT_HEADER_TIMEOUT_S, GatewayRunner
from gateway.settings import (
    RouterConfigError,
    SettingError,
    add_router_arguments,
    check_numbers,
    describe_router_config,
    router_config_from,
    worker_stale_after_s,
)
from kvutil.bus_auth import BusAuthError, add_bus_arguments, bus_auth_from, nats_url_from, redact_url
from router.config import RouterConfig
from router.policies import POLICIES

log = logging.getLogger("kvgate.gateway")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats", default=None, help="NATS URL, e.g. nats://127.0.0.1:4222 [NATS_URL]")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free one)")
    parser.add_argument("--policy", default="session_kv", choices=sorted(POLICIES), help="routing policy")
    parser.add_argument("--namespace", default="kvgate", help="bus namespace shared with the workers")
    _add_access_arguments(parser)
    _add_limit_arguments(parser)
    _add_timing_arguments(parser)
    _add_api_arguments(parser)
    add_router_arguments(parser)
    add_bus_arguments(parser)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")


def _add_access_arguments(parser: argparse.ArgumentParser) -> None:
    """Who may send requests, read /metrics and /ready; the tenants."""
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


def _add_limit_arguments(parser: argparse.ArgumentParser) -> None:
    """Bounds on a request's size and on the requests held."""
    parser.add_argument(
        "--max-body-bytes", type=int, default=8 * 1024 * 1024, help="larger request bodies get 413"
    )
    parser.add_argument(
        "--body-budget-mb",
        type=float,
        default=256.0,
        help="request bodies being read at once (MiB); a body past it gets 503 before it is read",
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


def _add_timing_arguments(parser: argparse.ArgumentParser) -> None:
    """Timeouts, back-offs and intervals."""
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
        "--body-timeout-s",
        type=float,
        default=60.0,
        help="seconds a request's body has to arrive after its headers, else 408",
    )
    parser.add_argument(
        "--snapshot-interval-s",
        type=float,
        default=30.0,
        help="seconds between index snapshots in the NATS object store (replicas take turns)",
    )


def _add_api_arguments(parser: argparse.ArgumentParser) -> None:
    """Settings of the Anthropic Messages and OpenAI Responses endpoints."""
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


def _tenant(item: str) -> tuple[str, str]:
    name, sep, key = item.partition("=")
    if not sep or not name or not key:
        raise RouterConfigError(f"--tenant expects NAME=KEY (got {len(item)} characters without one)")
    return name, key


# the numeric flags of `kvgate gateway`, as `check_numbers` takes them (--worker-stale-after-s apart)
POSITIVE_FLAGS = (
    "max_body_bytes", "max_prompt_tokens", "first_byte_timeout_s", "header_timeout_s", "snapshot_interval_s",
    "responses_ttl", "body_budget_mb", "body_timeout_s",
)  # fmt: skip
NOT_NEGATIVE_FLAGS = ("max_inflight_per_worker", "queue_bound", "prompt_cache_mb", "failure_backoff_s")


def config_from(args: argparse.Namespace, router_config: RouterConfig) -> GatewayConfig:
    """The gateway's settings from its command line; SettingError for one it cannot use."""
    check_numbers(args, POSITIVE_FLAGS, NOT_NEGATIVE_FLAGS)
    named = tuple(_tenant(item) for item in args.tenant)
    body_budget_bytes = int(args.body_budget_mb * 2**20)
    if body_budget_bytes < args.max_body_bytes:
        raise SettingError(
            f"--body-budget-mb ({args.body_budget_mb:g} MiB) must hold one body of --max-body-bytes "
            f"({args.max_body_bytes})"
        )
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
        body_budget_bytes=body_budget_bytes,
        body_timeout_s=args.body_timeout_s,
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
        split_turns=not args.no_split_turns,
    )


async def serve(config: GatewayConfig, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve until `stop` is set; logs the URL once listening."""
    gateway = Gateway(config)
    log.info("router settings: %s", describe_router_config(config.router_config))
    if config.router_config.session_admission and gateway.router.admission is None:
        log.warning("session_admission is ignored: only session_kv admits by session, not %s", config.policy)
    rc = config.router_config
    if (rc.kv_queue or rc.kv_affinity_ttl_s) and config.policy != "kv_overlap":
        log.warning("kv_queue_* and kv_affinity_ttl_s are kv_overlap's: %s ignores them", config.policy)
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
            runner.addresses[0][1],  # the port the system gave for --port 0
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
