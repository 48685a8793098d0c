"""`kvgate bridge`: put a vLLM or SGLang server behind kvgate by bridging its ZMQ KV events to the bus.

Start the engine with KV events on, e.g. for vLLM:
  --kv-events-config '{"enable_kv_cache_events":true,"publisher":"zmq",
                       "endpoint":"tcp://*:5557","replay_endpoint":"tcp://*:5558"}'
and `--block-size` equal to the bridge's `--block-size`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from urllib.parse import urlsplit

from engines.bridge import Bridge, BridgeConfig
from kvutil.bus_auth import BusAuthError, add_bus_arguments, bus_auth_from, nats_url_from
from router.protocol import ProtocolError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--zmq", required=True, help="the engine's KV events PUB endpoint, tcp://HOST:5557")
    parser.add_argument("--replay", default=None, help="the engine's replay endpoint, tcp://HOST:5558")
    parser.add_argument("--url", required=True, help="the engine's OpenAI-compatible URL the gateway calls")
    parser.add_argument("--model", required=True, help="the model name the engine serves")
    parser.add_argument("--block-size", type=int, default=16, help="must equal the engine's block size")
    parser.add_argument("--nats", default=None, help="NATS URL, e.g. nats://127.0.0.1:4222 [NATS_URL]")
    parser.add_argument("--worker-id", default=None, help="worker id on the bus (default: from --url)")
    parser.add_argument("--namespace", default="kvgate", help="bus namespace shared with the gateway")
    parser.add_argument(
        "--engine", choices=["vllm", "sglang"], default="vllm", help="which engine's events and metrics"
    )
    parser.add_argument(
        "--tokenizer",
        default="byte",
        help="the engine model's folder or its tokenizer.json: stored on the bus by content hash, with "
        "tokenizer_config.json and chat_template.jinja beside it, for the gateways",
    )
    parser.add_argument("--num-blocks", type=int, default=0, help="engine KV blocks (0: from /metrics)")
    parser.add_argument("--topic", default="", help="ZMQ topic to subscribe to (empty: all)")
    parser.add_argument(
        "--metrics-interval",
        type=float,
        default=0.5,
        help="seconds between scrapes of the engine's /metrics for load reports; 0 turns them off",
    )
    parser.add_argument(
        "--health-interval",
        type=float,
        default=1.0,
        help="seconds between checks of the engine's /health; 0 turns them off (default 1)",
    )
    parser.add_argument(
        "--health-failures",
        type=int,
        default=3,
        help="failed health checks in a row that take the engine off the bus until it answers (default 3)",
    )
    add_bus_arguments(parser)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")


def default_worker_id(url: str) -> str:
    """`http://vllm-0.vllm:8000` -> `vllm-0-vllm-8000`: a valid subject token derived from the URL."""
    host = url.split("://", 1)[-1].split("/", 1)[0]
    return "".join(ch if ch.isalnum() or ch in "-_" else "-" for ch in host)[:128] or "engine"


def check(args: argparse.Namespace) -> str | None:
    """What is wrong with the arguments, before anything connects; None when they are usable."""
    if args.nats is None:
        return "--nats (or NATS_URL) is required"
    if args.block_size < 1 or args.metrics_interval < 0 or args.num_blocks < 0:
        return "--block-size must be positive, --metrics-interval and --num-blocks >= 0"
    for flag, value, schemes in (
        ("--zmq", args.zmq, ("tcp", "ipc")),
        ("--replay", args.replay, ("tcp", "ipc")),
        ("--url", args.url, ("http", "https")),
        ("--nats", args.nats, ("nats", "tls", "ws", "wss")),
    ):
        if value is None:
            continue
        parsed = urlsplit(value)
        if parsed.scheme not in schemes or not (parsed.netloc or parsed.path):
            return f"{flag} {value!r} must be a {' or '.join(s + '://' for s in schemes)} address"
    return None


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    args.nats = nats_url_from(args.nats)
    problem = check(args)
    try:
        auth = bus_auth_from(args)
    except BusAuthError as exc:
        problem = problem or str(exc)
    if problem is not None:
        print(f"kvgate bridge: {problem}")
        return 2
    config = BridgeConfig(
        zmq_endpoint=args.zmq,
        url=args.url,
        model=args.model,
        nats_url=args.nats,
        bus_auth=auth,
        worker_id=args.worker_id or default_worker_id(args.url),
        block_size=args.block_size,
        replay_endpoint=args.replay,
        namespace=args.namespace,
        engine=args.engine,
        tokenizer=args.tokenizer,
        num_blocks=args.num_blocks,
        topic=args.topic,
        metrics_interval_s=args.metrics_interval,
        health_interval_s=args.health_interval,
        health_failures=max(1, args.health_failures),
    )
    try:
        bridge = Bridge(config)
    except (ProtocolError, ValueError) as exc:
        print(f"kvgate bridge: {exc}")
        return 2
    asyncio.run(_serve(bridge))
    return 0


async def _serve(bridge: Bridge) -> None:
    # SIGTERM (a pod stopping) deregisters the worker cleanly instead of waiting for its heartbeat to lapse.
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, bridge.stop)
    await bridge.run()
