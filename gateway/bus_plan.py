"""Where `kvgate up`'s bus is and how each part authenticates to it: a NATS given with `--nats` and its
credentials, or an embedded `nats-server` admitting only the users generated for this run, one per role
and per worker (gateway/bus_roles.py), which it restarts on the same port and store if it dies."""

from __future__ import annotations

import argparse
import asyncio
import logging
import time

from gateway.bus_roles import BusUser, authorization, generated_users
from gateway.natsd import NatsServer, NatsServerError
from kvutil.bus_auth import BusAuth, bus_auth_from
from router.protocol import Subjects

log = logging.getLogger("kvgate.up")


class BusPlan:
    """Where the bus is and how each part authenticates to it; owns the embedded server, if any."""

    def __init__(
        self, url: str, gateway: BusAuth, workers: dict[str, BusAuth], server: NatsServer | None
    ) -> None:
        self.url = url
        self.gateway = gateway
        self.workers = workers
        self.server = server
        self._restarts = 0
        self._next_start = 0.0

    @classmethod
    def make(cls, args: argparse.Namespace, worker_ids: list[str]) -> BusPlan:
        """Raises BusAuthError, NatsServerError or ProtocolError with a one-line reason."""
        if args.nats is not None:
            auth = bus_auth_from(args)
            return cls(args.nats, auth, dict.fromkeys(worker_ids, auth), None)
        if args.nats_no_auth:
            server = NatsServer().start()
            return cls(server.url, BusAuth(), dict.fromkeys(worker_ids, BusAuth()), server)
        gateway, workers = generated_users(Subjects(args.namespace), worker_ids)
        server = NatsServer(authorization=authorization([gateway, *workers.values()])).start()
        return cls(server.url, _password(gateway), {w: _password(u) for w, u in workers.items()}, server)

    async def watch(self) -> None:
        """Restart a dead embedded server on its port and store (1 s doubling to 30 s between tries)."""
        server = self.server
        if server is None or server.exit_code is None:
            return
        now = time.monotonic()
        if self._next_start == 0.0:
            delay = min(30.0, 2.0**self._restarts)
            self._next_start = now + delay
            code, output = server.exit_code, server.last_output()
            log.warning("nats-server exited with %s (%s); restarting in %.0f s", code, output, delay)
        elif now >= self._next_start:
            self._restarts += 1
            self._next_start = 0.0
            try:
                await asyncio.to_thread(server.start)
                log.info("nats-server restarted on %s", server.url)
            except NatsServerError as exc:
                log.warning("nats-server restart failed: %s", exc)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def _password(user: BusUser) -> BusAuth:
    return BusAuth(user=user.user, password=user.password)
