"""`kvgate up`: the whole system in one command.

An embedded `nats-server` (JetStream on, temporary store) unless `--nats` is given, N workers as child
processes (restarted with backoff if they crash), and the gateway in this process. Ctrl-C or SIGTERM
stops the gateway, then the workers (so they deregister), then NATS; nothing is left running. The
children run in their own session, so a terminal's Ctrl-C reaches only this supervisor, and on Linux
they get SIGTERM if the supervisor dies without cleaning up.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

from gateway.app import GatewayConfig
from gateway.natsd import NatsServer, free_port
from gateway.serve import (
    RouterConfigError,
    add_router_arguments,
    install_uvloop,
    router_config_from,
    serve,
)
from router.config import RouterConfig
from router.policies import POLICIES

log = logging.getLogger("kvgate.up")

_PR_SET_PDEATHSIG = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=int, default=2, help="number of local workers (default 2)")
    parser.add_argument("--engine", choices=("torch", "mock"), default="torch")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--policy", default="session_kv", choices=sorted(POLICIES))
    parser.add_argument("--nats", default=None, help="use this NATS instead of an embedded one")
    parser.add_argument("--namespace", default="kvgate")
    parser.add_argument("--worker-args", default="", help="extra arguments for every worker, one string")
    parser.add_argument("--max-inflight-per-worker", type=int, default=0)
    parser.add_argument("--ready-timeout", type=float, default=180.0, help="seconds to wait for the workers")
    add_router_arguments(parser)
    parser.add_argument("--log-level", default="INFO")


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM when the supervisor dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """One supervised worker process: the same command line on every restart."""

    def __init__(self, name: str, argv: list[str], url: str) -> None:
        self.name = name
        self.argv = argv
        self.url = url
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.next_start = 0.0

    def start(self) -> None:
        preexec = _die_with_parent if sys.platform.startswith("linux") else None
        self.proc = subprocess.Popen(self.argv, start_new_session=True, preexec_fn=preexec)

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def wait(self, timeout_s: float) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Supervisor:
    def __init__(self, args: argparse.Namespace, nats_url: str) -> None:
        self.args = args
        self.children: list[Child] = []
        extra = shlex.split(args.worker_args)
        for i in range(args.workers):
            port = free_port(args.host)
            argv = [
                sys.executable, "-m", "gateway.cli", "worker", "--engine", args.engine, "--nats", nats_url,
                "--host", args.host, "--port", str(port), "--namespace", args.namespace,
                "--worker-id", f"worker-{i}", *extra,
            ]  # fmt: skip
            self.children.append(Child(f"worker-{i}", argv, f"http://{args.host}:{port}"))

    def start(self) -> None:
        for child in self.children:
            child.start()

    async def watch(self, stop: asyncio.Event) -> None:
        """Restart crashed workers with backoff (1 s doubling to 30 s) until `stop`."""
        while not stop.is_set():
            now = time.monotonic()
            for child in self.children:
                code = child.exited()
                if code is None:
                    continue
                if child.next_start == 0.0:
                    delay = min(30.0, 2.0**child.restarts)
                    child.next_start = now + delay
                    log.warning("%s exited with %s; restarting in %.0f s", child.name, code, delay)
                elif now >= child.next_start:
                    child.restarts += 1
                    child.next_start = 0.0
                    child.start()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    def stop(self, timeout_s: float = 10.0) -> None:
        for child in self.children:
            child.terminate()
        deadline = time.monotonic() + timeout_s
        for child in self.children:
            child.wait(max(0.1, deadline - time.monotonic()))


def _get_json(url: str) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, None
    except (OSError, ValueError):
        return 0, None


async def _wait_ready(
    gateway_url: str,
    supervisor: Supervisor,
    timeout_s: float,
    stop: asyncio.Event,
    gateway: asyncio.Task[None],
) -> str:
    """Wait until the gateway sees every worker; the model name to advertise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        if gateway.done():  # e.g. its port is taken: say so now, not after the timeout
            raise RuntimeError(f"the gateway stopped: {gateway.exception()}")
        status, body = await asyncio.to_thread(_get_json, gateway_url + "/ready")
        if status == 200 and isinstance(body, dict) and body.get("workers", 0) >= len(supervisor.children):
            _, models = await asyncio.to_thread(_get_json, gateway_url + "/v1/models")
            data = models.get("data") if isinstance(models, dict) else None
            return data[0]["id"] if data else "unknown"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
    raise TimeoutError(f"the workers were not ready within {timeout_s:.0f} s")


def _banner(url: str, model: str, args: argparse.Namespace, nats_url: str) -> str:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 16})
    return (
        f"kvgate is up: {url}  ({args.workers} {args.engine} workers, "
        f"policy {args.policy}, NATS {nats_url})\n"
        f"try:\n  curl {url}/v1/chat/completions -H 'content-type: application/json' "
        f"-H 'x-session-id: demo' -d '{body}'\n"
        "Ctrl-C stops everything."
    )


async def _main(args: argparse.Namespace, nats_url: str, router_config: RouterConfig) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    supervisor = Supervisor(args, nats_url)
    config = GatewayConfig(
        nats_url=nats_url, namespace=args.namespace, policy=args.policy,
        max_inflight_per_worker=args.max_inflight_per_worker, gateway_id="gateway-up",
        router_config=router_config,
    )  # fmt: skip
    supervisor.start()
    gateway = asyncio.create_task(serve(config, args.host, args.port, stop))
    watcher = asyncio.create_task(supervisor.watch(stop))
    url = f"http://{args.host}:{args.port}"
    code = 0
    try:
        model = await _wait_ready(url, supervisor, args.ready_timeout, stop, gateway)
        if not stop.is_set():
            print(_banner(url, model, args, nats_url), flush=True)
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({stopper, gateway}, return_when=asyncio.FIRST_COMPLETED)  # a signal, or a crash
        stopper.cancel()
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
    return code


def run(args: argparse.Namespace) -> int:
    try:  # before anything starts: a bad file must not leave NATS and workers behind
        router_config = router_config_from(args)
    except RouterConfigError as exc:
        print(f"kvgate up: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    install_uvloop()
    nats: NatsServer | None = None
    nats_url = args.nats
    if nats_url is None:
        nats = NatsServer().start()
        nats_url = nats.url
    try:
        return asyncio.run(_main(args, nats_url, router_config))
    finally:
        if nats is not None:
            nats.close()
