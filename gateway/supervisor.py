"""`kvgate up`'s worker processes: started with their own bus credentials in their environment (never
on their command line), restarted with backoff if they crash, stopped so that they deregister. The
children run in their own session, so a terminal's Ctrl-C reaches only the supervisor, and on Linux they
get SIGTERM if the supervisor dies without cleaning up."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shlex
import subprocess
import sys
import time

from gateway.bus_plan import BusPlan
from kvutil.bus_auth import BusAuth
from kvutil.child_process import spawn_tied

log = logging.getLogger("kvgate.up")

USAGE_EXIT = 2  # what `kvgate worker` (argparse and its own settings checks) exits with on bad arguments


class WorkerRefused(Exception):
    """A worker exited with the usage status: restarting it would fail the same way."""


class Child:
    """One supervised worker process: the same command line on every restart."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = argv
        self.env = env  # the credentials go here, not in argv (visible to every local user)
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self.next_start = 0.0

    def start(self) -> None:
        self.proc = spawn_tied(self.argv, env=self.env)

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


def _child_env(auth: BusAuth) -> dict[str, str]:
    """This process's environment, its NATS credentials replaced by the worker's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    return {**env, **auth.environ()}


class Supervisor:
    def __init__(self, args: argparse.Namespace, bus: BusPlan) -> None:
        self.args = args
        self.bus = bus
        self.children: list[Child] = []
        self.refused: str | None = None  # why a worker would not start with its arguments
        extra = shlex.split(args.worker_args)
        for wid, auth in bus.workers.items():
            # port 0: the worker binds a port the system chooses and registers it; one picked here would
            # be bound only after the child's imports, and may be taken by then (a restart on the same
            # port fails again for as long as whoever took it holds it)
            argv = [
                sys.executable, "-m", "gateway.cli", "worker", "--engine", args.engine, "--nats", bus.url,
                "--host", args.host, "--port", "0", "--namespace", args.namespace,
                "--worker-id", wid, *extra,
            ]  # fmt: skip
            self.children.append(Child(wid, argv, _child_env(auth)))

    def start(self) -> None:
        for child in self.children:
            child.start()

    async def watch(self, stop: asyncio.Event) -> None:
        """Restart crashed workers and a dead embedded NATS with backoff (1 s doubling to 30 s) until
        `stop`; a worker that exits with the usage status stops everything instead."""
        while not stop.is_set():
            now = time.monotonic()
            for child in self.children:
                code = child.exited()
                if code is None or self.refused is not None:
                    continue
                if code == USAGE_EXIT:  # its arguments are wrong: a restart would fail the same way
                    self.refused = f"{child.name} refused its arguments (exit {code}); see its error above"
                    log.error("%s", self.refused)
                    stop.set()
                elif child.next_start == 0.0:
                    delay = min(30.0, 2.0**child.restarts)
                    child.next_start = now + delay
                    log.warning("%s exited with %s; restarting in %.0f s", child.name, code, delay)
                elif now >= child.next_start:
                    child.restarts += 1
                    child.next_start = 0.0
                    child.start()
            await self.bus.watch()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)

    def stop(self, timeout_s: float = 10.0) -> None:
        for child in self.children:
            child.terminate()
        deadline = time.monotonic() + timeout_s
        for child in self.children:
            child.wait(max(0.1, deadline - time.monotonic()))
