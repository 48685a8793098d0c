"""`kvgate worker`: one inference worker (torch or mock engine) serving HTTP and publishing on NATS.

Prints one line `kvgate worker <id> ready on <url>` once it accepts requests (and /health says 200),
so parent processes can wait for it. SIGTERM or SIGINT shut it down cleanly (deregistered).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import re
import signal
import socket
import sys
import time
import uuid
from collections.abc import Callable

from aiohttp import web

from engines.engine import Engine, EngineConfig
from engines.loop import EngineLoop
from engines.mock import DEFAULT_HOST_BANDWIDTH_GBPS, MockRunner, TransferModel
from engines.onboarding import add_onboarding_arguments
from engines.runner import ModelRunner
from engines.worker import WorkerApp, WorkerSettings
from kvutil.bus_auth import BusAuth, add_bus_arguments, bus_auth_from, nats_url_from
from kvutil.tracing import Tracing
from router.chat import HFTokenizer, Tokenizer
from router.hashing import DEFAULT_BLOCK_SIZE
from router.protocol import (
    DEFAULT_NAMESPACE,
    MAX_PRIORITY,
    ProtocolError,
    Subjects,
    WorkerRegistration,
    check_token,
)

log = logging.getLogger("kvgate.worker")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--engine",
        choices=("torch", "mock"),
        default="mock",
        help="torch: a Llama-style model (CPU or CUDA); mock: simulated GPU timing, no torch needed",
    )
    parser.add_argument(
        "--nats", metavar="URL", help="NATS server [NATS_URL]; without it the worker publishes nothing"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8001, help="port to listen on (0: any free one)")
    parser.add_argument("--advertise-url", help="URL the gateway should use (default http://HOST:PORT)")
    parser.add_argument("--model", help="served model name (default: the engine's own)")
    parser.add_argument("--model-path", help="torch: a local Hugging Face checkpoint folder")
    parser.add_argument("--device", help="torch: cpu, cuda, cuda:1 (default: cuda when present)")
    _add_capacity_arguments(parser)
    _add_mock_arguments(parser)
    _add_host_tier_arguments(parser)
    _add_scheduling_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="torch: weights of the default tiny model")
    parser.add_argument("--worker-id", help="subject-safe id (default: engine-host-port-random)")
    parser.add_argument(
        "--namespace", default=DEFAULT_NAMESPACE, help="bus namespace shared with the gateway"
    )
    add_bus_arguments(parser)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")


def _add_capacity_arguments(parser: argparse.ArgumentParser) -> None:
    """The KV cache and the batch: blocks, block size, sequences and tokens per step."""
    parser.add_argument(
        "--num-blocks", type=int, default=1024, help="KV cache blocks; x --block-size = max_model_len"
    )
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="tokens per KV block")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="sequences running at once")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=8192, help="tokens per engine step (chunked prefill)"
    )


def _add_mock_arguments(parser: argparse.ArgumentParser) -> None:
    """The mock engine's clock and answers."""
    parser.add_argument(
        "--speedup", type=float, default=1.0, help="mock: run this many times faster than the modelled GPU"
    )
    parser.add_argument("--eos-after", type=int, default=None, help="mock: end each answer after N tokens")


def _add_host_tier_arguments(parser: argparse.ArgumentParser) -> None:
    """The host-memory KV tier and its link."""
    parser.add_argument(
        "--host-blocks",
        type=int,
        default=0,
        help="host-memory KV tier behind the device's, in blocks (default 0: none)",
    )
    parser.add_argument(
        "--host-bandwidth",
        type=float,
        default=DEFAULT_HOST_BANDWIDTH_GBPS,
        help="mock: host link GB/s that times onboarding copies (default %(default)s, PCIe Gen5 x16)",
    )


def _add_scheduling_arguments(parser: argparse.ArgumentParser) -> None:
    """The scheduler's rules beyond first come first served, and how host copies are waited for."""
    parser.add_argument(
        "--preempt-for-prompts",
        action="store_true",
        help="a prompt that does not fit preempts decoding requests (first token out) instead of "
        "waiting for them (engines/scheduler.py; default: off, vLLM's first come first served)",
    )
    parser.add_argument(
        "--priority-scheduling",
        action="store_true",
        help="order the queue by each request's 'priority' (larger first) and let a request that does "
        "not fit preempt running ones it outranks by more than --priority-threshold, as SGLang's "
        "--enable-priority-scheduling (engines/scheduler.py; default: off)",
    )
    parser.add_argument(
        "--priority-threshold",
        type=int,
        default=10,
        help="with --priority-scheduling: the priority margin a request needs to preempt "
        "(default %(default)s, SGLang's)",
    )
    add_onboarding_arguments(parser, "the engine")


def default_worker_id(engine: str, port: int) -> str:
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:40]
    return f"{engine}-{host}-{port}-{uuid.uuid4().hex[:6]}"


def build_runner(args: argparse.Namespace) -> tuple[ModelRunner, Tokenizer, str]:
    if args.engine == "mock":
        transfer = TransferModel(bandwidth_gbps=args.host_bandwidth)
        runner = MockRunner(
            args.num_blocks,
            args.block_size,
            speedup=args.speedup,
            eos_after=args.eos_after,
            transfer=transfer,
        )
        return runner, runner.tokenizer, runner.model_name
    from engines.torch import TorchRunner  # only now: torch is a heavy import

    torch_runner = TorchRunner(
        args.num_blocks,
        args.block_size,
        args.model_path,
        args.device,
        args.seed,
        host_blocks=args.host_blocks,
    )
    return torch_runner, torch_runner.tokenizer, torch_runner.model_name


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        num_blocks=args.num_blocks,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        host_blocks=args.host_blocks,
        preempt_for_prompts=args.preempt_for_prompts,
        priority_scheduling=args.priority_scheduling,
        priority_threshold=args.priority_threshold,
        onboarding=args.onboarding,
    )


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        worker_id = check_token(args.worker_id or default_worker_id(args.engine, args.port), "worker id")
        subjects = Subjects(args.namespace)
        for name in ("num_blocks", "block_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be positive")
        if args.speedup <= 0:
            raise ValueError("--speedup must be positive")
        if args.host_blocks < 0:
            raise ValueError("--host-blocks must not be negative")
        if not 0 <= args.priority_threshold <= MAX_PRIORITY:
            raise ValueError(f"--priority-threshold must be between 0 and {MAX_PRIORITY}")
        if args.priority_scheduling and args.preempt_for_prompts:
            raise ValueError("--priority-scheduling and --preempt-for-prompts are two engines: choose one")
        if not args.host_bandwidth > 0:
            raise ValueError("--host-bandwidth must be positive")
        args.nats = nats_url_from(args.nats)
        auth = bus_auth_from(args)
    except (ProtocolError, ValueError) as exc:
        print(f"kvgate worker: {exc}", file=sys.stderr)
        return 2
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args, worker_id, subjects, auth))
    except OSError as exc:  # the port is taken, or the host is not ours
        print(f"kvgate worker: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


def _registration(
    kind: str, worker_id: str, url: str, model_name: str, engine: Engine, tokenizer: Tokenizer
) -> Callable[[], WorkerRegistration]:
    """The worker's registry entry as of now (its heartbeat time), under one epoch for this process."""
    config = engine.config
    epoch = time.time_ns()

    def registration() -> WorkerRegistration:
        return WorkerRegistration(
            worker_id=worker_id,
            url=url,
            model=model_name,
            block_size=config.block_size,
            num_blocks=config.num_blocks,
            engine=kind,
            epoch=epoch,
            heartbeat_ts=time.time(),
            tokenizer=tokenizer.name,
            max_num_seqs=config.max_num_seqs,
            max_model_len=engine.max_model_len,
            priority_threshold=config.priority_threshold if config.priority_scheduling else -1,
            returns_token_ids=True,
            host_blocks=config.host_blocks,
            max_num_batched_tokens=config.max_num_batched_tokens,
        )

    return registration


async def serve(args: argparse.Namespace, worker_id: str, subjects: Subjects, auth: BusAuth) -> None:
    runner, tokenizer, engine_model = build_runner(args)
    config = engine_config(args)
    engine = Engine(config, runner, time.monotonic)
    loop = EngineLoop(engine, threaded=not runner.models_step_time)  # real compute: off the event loop
    model_name = args.model or engine_model
    tracing = Tracing("kvgate-worker", "kvgate.worker")
    settings = WorkerSettings(model_name=model_name, worker_id=worker_id)
    worker = WorkerApp(loop, tokenizer, settings, tracer=tracing.tracer)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)

    loop.start()
    app_runner = web.AppRunner(worker.app, handler_cancellation=True, access_log=None)
    await app_runner.setup()
    site = web.TCPSite(app_runner, args.host, args.port, reuse_address=True)
    await site.start()
    # --port 0: the port the system gave, so that nothing can take it between its choice and the bind
    url = args.advertise_url or f"http://{args.host}:{app_runner.addresses[0][1]}"
    registration = _registration(args.engine, worker_id, url, model_name, engine, tokenizer)
    publisher = None
    if args.nats:
        from engines.publisher import Publisher  # nats-py only when a bus is named

        bundle = tokenizer.files.encode() if isinstance(tokenizer, HFTokenizer) else None
        publisher = Publisher(args.nats, subjects, loop, registration, auth=auth, tokenizer_bundle=bundle)
    if publisher is not None:
        await publisher.start()
    worker.ready = True
    print(f"kvgate worker {worker_id} ready on {url} (engine {args.engine}, pid {os.getpid()})", flush=True)
    try:
        await stop.wait()
    finally:
        log.info("worker %s shutting down", worker_id)
        worker.ready = False
        if publisher is not None:
            await publisher.stop()
        await app_runner.cleanup()
        await loop.stop()
        tracing.shutdown()  # flushes the spans still queued
