"""`kvgate up`: the whole system in one command.

An embedded `nats-server` (JetStream on, temporary store) unless `--nats` is given, N workers as child
processes (restarted with backoff if they crash), and the gateway in this process. The embedded server
admits only the users generated for this run, one per role and per worker (gateway/bus_roles.py), with
random passwords handed to the workers through their environment, never their command line; it is
restarted on the same port and store if it dies, and its output goes to the log. Ctrl-C or SIGTERM
stops the gateway, then the workers (so they deregister), then NATS; nothing is left running. The
children run in their own session, so a terminal's Ctrl-C reaches only this supervisor, and on Linux
they get SIGTERM if the supervisor dies without cleaning up. The bus is `gateway.bus_plan`, the workers'
processes `gateway.supervisor`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import socket
import sys
import time

from gateway.bus_plan import BusPlan
from gateway.config import GatewayConfig
from gateway.natsd import NatsServerError
from gateway.serve import install_uvloop, serve, tune_gc_for_serving
from gateway.settings import (
    SettingError,
    add_router_arguments,
    check_numbers,
    router_config_from,
    worker_stale_after_s,
)
from gateway.supervisor import USAGE_EXIT, Supervisor, WorkerRefused
from kvutil.bus_auth import BusAuthError, add_bus_arguments, redact_url
from kvutil.http_probe import get_json
from router.config import RouterConfig
from router.policies import POLICIES
from router.protocol import ProtocolError

log = logging.getLogger("kvgate.up")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=2, help="number of local workers")
    parser.add_argument(
        "--engine",
        choices=("torch", "mock"),
        default="torch",
        help="torch: the tiny seeded model (CPU or CUDA); mock: simulated GPU timing, no torch needed",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address the gateway listens on")
    parser.add_argument("--port", type=int, default=8000, help="the gateway's port (workers take free ones)")
    parser.add_argument("--policy", default="session_kv", choices=sorted(POLICIES), help="routing policy")
    parser.add_argument(
        "--nats", default=None, help="use this NATS (--nats-* credentials) instead of an embedded one"
    )
    parser.add_argument(
        "--nats-no-auth",
        action="store_true",
        help="embedded NATS without credentials (anyone who can reach its port controls routing)",
    )
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        dest="api_keys",
        help="accept only requests bearing this key (repeatable)",
    )
    parser.add_argument("--namespace", default="kvgate", help="bus namespace (several systems on one NATS)")
    parser.add_argument("--worker-args", default="", help="extra arguments for every worker, one string")
    parser.add_argument(
        "--max-inflight-per-worker",
        type=int,
        default=0,
        help="in-flight requests per worker before queueing (0: the worker's max_num_seqs)",
    )
    parser.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for the workers")
    add_router_arguments(parser)
    add_bus_arguments(parser)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")


async def _wait_ready(
    gateway_url: str,
    supervisor: Supervisor,
    timeout_s: float,
    stop: asyncio.Event,
    gateway: asyncio.Task[None],
    api_keys: list[str],
) -> str | None:
    """Wait until the gateway sees every worker; the model name to advertise, or None when stopped
    (a signal) before they were."""
    key = api_keys[0] if api_keys else None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        if supervisor.refused is not None:
            break
        if gateway.done():  # e.g. its port is taken: say so now, not after the timeout
            raise RuntimeError(f"the gateway stopped: {gateway.exception()}")
        status, body = await asyncio.to_thread(get_json, gateway_url + "/ready", 2.0, key)
        if status == 200 and isinstance(body, dict) and body.get("workers", 0) >= len(supervisor.children):
            _, models = await asyncio.to_thread(get_json, gateway_url + "/v1/models", 2.0, key)
            data = models.get("data") if isinstance(models, dict) else None
            return data[0]["id"] if data else "unknown"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
    if supervisor.refused is not None:
        raise WorkerRefused(supervisor.refused)
    if stop.is_set():
        return None  # Ctrl-C while starting: a stop, not a timeout
    raise TimeoutError(f"the workers were not ready within {timeout_s:.0f} s")


def _banner(url: str, model: str, args: argparse.Namespace, bus: BusPlan) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16})
    key = "-H 'authorization: Bearer YOUR_KEY' " if args.api_keys else ""  # never print a secret
    secured = "" if bus.server is None else (", no NATS auth" if args.nats_no_auth else ", NATS auth on")
    return (
        f"kvgate is up: {url}  ({args.workers} {args.engine} workers, "
        f"policy {args.policy}, NATS {redact_url(bus.url)}{secured})\n"
        f"try:\n  curl {url}/v1/chat/completions -H 'content-type: application/json' {key}"
        f"-H 'x-session-id: demo' -d '{body}'\n"
        "Ctrl-C stops everything."
    )


def gateway_config(
    args: argparse.Namespace, bus: BusPlan, router_config: RouterConfig, stale_after_s: float
) -> GatewayConfig:
    """The gateway `kvgate up` runs, from its flags and the bus it planned."""
    return GatewayConfig(
        nats_url=bus.url, bus_auth=bus.gateway, namespace=args.namespace, policy=args.policy,
        api_keys=tuple(args.api_keys), max_inflight_per_worker=args.max_inflight_per_worker,
        gateway_id="gateway-up", router_config=router_config, stale_after_s=stale_after_s,
        split_turns=not args.no_split_turns,
    )  # fmt: skip


async def _main(
    args: argparse.Namespace, bus: BusPlan, router_config: RouterConfig, stale_after_s: float
) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    supervisor = Supervisor(args, bus)
    config = gateway_config(args, bus, router_config, stale_after_s)
    supervisor.start()
    gateway = asyncio.create_task(serve(config, args.host, args.port, stop))
    watcher = asyncio.create_task(supervisor.watch(stop))
    url = f"http://{args.host}:{args.port}"
    code = 0
    try:
        model = await _wait_ready(url, supervisor, args.ready_timeout, stop, gateway, args.api_keys)
        if model is not None and not stop.is_set():
            print(_banner(url, model, args, bus), flush=True)
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({stopper, gateway}, return_when=asyncio.FIRST_COMPLETED)  # a signal, or a crash
        stopper.cancel()
    except WorkerRefused:
        pass  # the watcher has said why; the exit status is set below
    except (TimeoutError, RuntimeError) as exc:
        log.error("%s", exc)
        code = 1
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await gateway  # a failed bind (port in use) surfaces here
        await watcher
        await asyncio.to_thread(supervisor.stop)
    if gateway.done() and not gateway.cancelled() and gateway.exception() is not None:
        code = 1
    return USAGE_EXIT if supervisor.refused is not None else code


def _port_taken(host: str, port: int) -> str | None:
    """Why the gateway could not listen on host:port, checked before anything starts."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


def run(args: argparse.Namespace) -> int:
    try:  # before anything starts: a bad file must not leave NATS and workers behind
        router_config = router_config_from(args)
        stale_after_s = worker_stale_after_s(args)
        check_numbers(args, positive=["workers", "ready_timeout"], not_negative=["max_inflight_per_worker"])
    except SettingError as exc:
        print(f"kvgate up: {exc}", file=sys.stderr)
        return 2
    problem = _port_taken(args.host, args.port)
    if problem is not None:
        print(f"kvgate up: {problem}", file=sys.stderr)
        return 1
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    install_uvloop()
    tune_gc_for_serving()
    try:
        bus = BusPlan.make(args, [f"worker-{i}" for i in range(args.workers)])
    except (BusAuthError, ProtocolError) as exc:
        print(f"kvgate up: {exc}", file=sys.stderr)
        return 2
    except NatsServerError as exc:
        print(f"kvgate up: {exc}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(_main(args, bus, router_config, stale_after_s))
    finally:
        bus.close()
