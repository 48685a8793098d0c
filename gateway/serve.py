"""`kvgate gateway`: the routing gateway against a NATS bus (uvloop when installed)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import uuid

from aiohttp import web

from gateway.app import Gateway, GatewayConfig
from router.policies import POLICIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats", required=True, help="NATS URL, e.g. nats://127.0.0.1:4222")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--policy", default="session_kv", choices=sorted(POLICIES), help="(default: session_kv)"
    )
    parser.add_argument("--namespace", default="kvgate", help="bus namespace shared with the workers")
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        dest="api_keys",
        help="accept only requests bearing this key (repeatable)",
    )
    parser.add_argument("--max-body-bytes", type=int, default=8 * 1024 * 1024)
    parser.add_argument("--max-prompt-tokens", type=int, default=131_072)
    parser.add_argument(
        "--max-inflight-per-worker",
        type=int,
        default=0,
        help="in-flight requests per worker before queueing (0: the worker's max_num_seqs)",
    )
    parser.add_argument("--queue-bound", type=int, default=256, help="queued requests beyond which 429")
    parser.add_argument(
        "--snapshot-interval-s",
        type=float,
        default=30.0,
        help="seconds between index snapshots in the NATS object store (replicas take turns)",
    )
    parser.add_argument("--log-level", default="INFO")


def config_from(args: argparse.Namespace) -> GatewayConfig:
    return GatewayConfig(
        nats_url=args.nats,
        namespace=args.namespace,
        policy=args.policy,
        api_keys=tuple(args.api_keys),
        max_body_bytes=args.max_body_bytes,
        max_prompt_tokens=args.max_prompt_tokens,
        max_inflight_per_worker=args.max_inflight_per_worker,
        queue_bound=args.queue_bound,
        snapshot_interval_s=args.snapshot_interval_s,
        gateway_id=f"gateway-{uuid.uuid4().hex[:8]}",
    )


async def serve(config: GatewayConfig, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve until `stop` is set; logs the URL once listening."""
    gateway = Gateway(config)
    runner = web.AppRunner(gateway.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, backlog=1024)
        await site.start()
        logging.getLogger("kvgate.gateway").info(
            "gateway listening on http://%s:%d (policy %s, namespace %s)",
            host,
            port,
            config.policy,
            config.namespace,
        )
        await stop.wait()
    finally:
        await runner.cleanup()


def install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    install_uvloop()
    config = config_from(args)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve(config, args.host, args.port, stop)

    asyncio.run(main())
    return 0
