"""Per-role bus permissions against a real nats-server with the authorization `kvgate up` generates:
no credentials or a wrong password is refused, a real worker process registers with its own
credentials, and a registration injected by a client without that worker's credentials (the gateway's,
another worker's, or a worker's entry naming someone else) never reaches the gateway's pool."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import bcrypt
import nats
import pytest

from engines.publisher import store_tokenizer
from gateway.bus import Bus
from gateway.bus_roles import BusUser, authorization, generated_users
from gateway.metrics import GatewayMetrics
from gateway.natsd import NatsServer, free_port
from gateway.tokenizers import Tokenizers
from kvutil.bus_auth import BusAuth
from router.protocol import Subjects, WorkerRegistration, encode
from router.router import Router
from router.tokenizer_files import digest, read_folder
from tests.router.chat_families import write_tokenizer_folder

NAMESPACE = "roles"


class Users:
    def __init__(self, gateway: BusUser, workers: dict[str, BusUser]) -> None:
        self.gateway = gateway
        self.workers = workers


@pytest.fixture(scope="module")
def secured() -> Iterator[tuple[NatsServer, Users]]:
    gateway, workers = generated_users(Subjects(NAMESPACE), ["worker-0", "worker-1"])
    with NatsServer(authorization=authorization([gateway, *workers.values()])) as server:
        yield server, Users(gateway, workers)


def auth(user: BusUser) -> BusAuth:
    return BusAuth(user=user.user, password=user.password)


async def connect(url: str, credentials: BusAuth) -> nats.NATS:
    options = credentials.connect_options()
    return await nats.connect(url, allow_reconnect=False, connect_timeout=2, **options)


def registration(worker_id: str, url: str = "http://127.0.0.1:9") -> WorkerRegistration:
    return WorkerRegistration(
        worker_id=worker_id, url=url, model="mock", block_size=16, num_blocks=64,
        engine="mock", epoch=1, heartbeat_ts=time.time(),
    )  # fmt: skip


@pytest.mark.parametrize("credentials", [BusAuth(), BusAuth(user="gateway", password="wrong")])
async def test_a_client_without_valid_credentials_is_refused(secured, credentials: BusAuth) -> None:
    server, _ = secured
    with pytest.raises(Exception, match=r"(?i)authorization|no servers"):
        nc = await connect(server.url, credentials)
        await nc.close()


def start_worker(server: NatsServer, user: BusUser, worker_id: str, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NATS_")}
    env.update(auth(user).environ())  # as `kvgate up` hands them over: never on the command line
    argv = [
        sys.executable, "-m", "gateway.cli", "worker", "--engine", "mock", "--nats", server.url,
        "--port", str(free_port()), "--namespace", NAMESPACE, "--worker-id", worker_id,
    ]  # fmt: skip
    with log.open("wb") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


async def test_only_a_worker_with_its_own_credentials_joins_the_pool(secured, tmp_path: Path) -> None:
    server, users = secured
    subjects = Subjects(NAMESPACE)
    bus = Bus(server.url, subjects, Router(), GatewayMetrics(), auth=auth(users.gateway), stale_after_s=5.0)
    worker = start_worker(server, users.workers["worker-0"], "worker-0", tmp_path / "worker.log")
    try:
        await bus.start()
        deadline = time.monotonic() + 60
        while "worker-0" not in bus.workers:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()
            assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
            await asyncio.sleep(0.1)
        assert "password" not in (tmp_path / "worker.log").read_text().lower()

        injected = 0
        for user, key, entry in (
            (users.gateway, "evil", registration("evil")),  # the gateway's role cannot register
            (users.workers["worker-1"], "evil", registration("evil")),  # nor can another worker's
            (users.workers["worker-1"], "worker-0", registration("worker-0", "http://attacker:1")),
        ):
            nc = await connect(server.url, auth(user))
            try:
                kv = await nc.jetstream().key_value(subjects.registry_bucket)
                with pytest.raises(Exception):  # noqa: B017 - a permissions violation: the put times out
                    await kv.put(key, encode(entry), timeout=1.0)
            finally:
                await nc.close()
        # worker-1's credentials may write worker-1's entry only: one naming another worker is ignored
        nc = await connect(server.url, auth(users.workers["worker-1"]))
        try:
            kv = await nc.jetstream().key_value(subjects.registry_bucket)
            await kv.put("worker-1", encode(registration("evil", "http://attacker:1")))
            injected += 1
        finally:
            await nc.close()
        deadline = time.monotonic() + 30  # until the gateway has seen (and refused) the injected entry
        while bus.metrics.bad_registrations._value.get() < injected:
            assert time.monotonic() < deadline, "the gateway never saw the injected registration"
            await asyncio.sleep(0.05)
        assert set(bus.workers) == {"worker-0"}
        assert bus.workers["worker-0"].registration.url.startswith("http://127.0.0.1:")
        assert bus.metrics.bad_registrations._value.get() == injected
    finally:
        worker.terminate()
        worker.wait(10)
        await bus.stop()


async def test_a_worker_cannot_publish_another_workers_events_or_load(secured) -> None:
    server, users = secured
    subjects = Subjects(NAMESPACE)
    watcher = await connect(server.url, auth(users.gateway))
    seen: list[str] = []

    async def record(msg: nats.aio.msg.Msg) -> None:
        seen.append(msg.subject)

    sub = await watcher.subscribe(f"{subjects.prefix}.>", cb=record)
    await watcher.flush()  # the subscription is in place at the server before anything is published
    worker1 = await connect(server.url, auth(users.workers["worker-1"]))
    try:
        await worker1.publish(subjects.load("worker-0"), b"forged")
        await worker1.publish(subjects.kv("worker-0"), b"forged")
        await worker1.publish(subjects.load("worker-1"), b"own")
        await worker1.flush()
        # one publisher's messages arrive in order: the forged ones would be in before its own
        deadline = time.monotonic() + 30
        while subjects.load("worker-1") not in seen:
            assert time.monotonic() < deadline, seen
            await asyncio.sleep(0.02)
        assert seen == [subjects.load("worker-1")]
    finally:
        await sub.unsubscribe()
        await worker1.close()
        await watcher.close()


async def test_a_worker_stores_its_tokenizer_and_the_gateway_fetches_it(secured, tmp_path: Path) -> None:
    server, users = secured
    files = read_folder(write_tokenizer_folder("qwen2.5-7b-instruct", tmp_path / "qwen"))
    assert files is not None
    bucket = Subjects(NAMESPACE).tokenizer_bucket
    worker = await connect(server.url, auth(users.workers["worker-0"]))
    gateway = await connect(server.url, auth(users.gateway))
    try:
        await store_tokenizer(worker, bucket, files.encode())
        await store_tokenizer(worker, bucket, files.encode())  # the second worker of the model
        tokenizer = await Tokenizers(bucket, lambda: gateway).load(digest(files.encode()))
        assert tokenizer.vocab_size > 256
    finally:
        await worker.close()
        await gateway.close()


async def server_output(server: NatsServer, caplog: pytest.LogCaptureFixture) -> str:
    """The server's start-up output, as far as "Server is ready" (its warnings come before that)."""
    deadline = time.monotonic() + 30
    while not any("Server is ready" in r.getMessage() for r in caplog.records if r.name == "kvgate.nats"):
        assert time.monotonic() < deadline, server.last_output()
        await asyncio.sleep(0.02)
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "kvgate.nats")


async def test_generated_passwords_reach_the_server_as_bcrypt_hashes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """nats-server warns about plaintext passwords in its configuration: the generated users go in as
    hashes (no warning, and no password in the file), and their passwords still connect."""
    caplog.set_level(logging.DEBUG, logger="kvgate.nats")
    with NatsServer(authorization={"users": [{"user": "plain", "password": "in-the-clear"}]}) as control:
        assert "Plaintext passwords detected" in await server_output(control, caplog)  # the capture works
    caplog.clear()
    gateway, workers = generated_users(Subjects(NAMESPACE), ["worker-0"])
    with NatsServer(authorization=authorization([gateway, *workers.values()])) as server:
        output = await server_output(server, caplog)
        assert "[WRN]" not in output and "Plaintext" not in output, output
        config = Path(server.store_dir, "nats-server.conf").read_text()
        entries = {entry["user"]: entry["password"] for entry in json.loads(config)["authorization"]["users"]}
        for user in (gateway, *workers.values()):
            assert user.password not in config
            assert entries[user.user].startswith("$2b$")
            assert bcrypt.checkpw(user.password.encode(), entries[user.user].encode())
            nc = await connect(server.url, auth(user))
            await nc.close()
        with pytest.raises(Exception, match=r"(?i)authorization|no servers"):
            await connect(server.url, BusAuth(user=gateway.user, password=workers["worker-0"].password))


def test_a_token_server_admits_the_token_only() -> None:
    with NatsServer(authorization={"token": "s3cret-token"}) as server:

        async def check() -> None:
            nc = await connect(server.url, BusAuth(token="s3cret-token"))
            await nc.close()
            with pytest.raises(Exception, match=r"(?i)authorization|no servers"):
                await connect(server.url, BusAuth(token="wrong"))

        asyncio.run(check())


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_mutual_tls_with_the_ca_and_client_certificate_options(tmp_path: Path) -> None:
    """A nats-server that verifies client certificates: the --nats-ca/-cert/-key options connect,
    a client without a certificate is refused."""
    days, subj = ("-days", "1"), "-subj"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", *days,
             subj, "/CN=kvgate-test-ca", cwd=tmp_path)  # fmt: skip
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 subj, f"/CN={name}", cwd=tmp_path)  # fmt: skip
        (tmp_path / f"{name}.ext").write_text(ext + "\n")
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.pem", *days, "-extfile", f"{name}.ext", cwd=tmp_path)  # fmt: skip
    tls = {
        "cert_file": str(tmp_path / "server.pem"),
        "key_file": str(tmp_path / "server.key"),
        "ca_file": str(tmp_path / "ca.pem"),
        "verify": True,
    }
    with NatsServer(tls=tls) as server:
        url = server.url.replace("nats://", "tls://")
        files = {"tls_ca": "ca.pem", "tls_cert": "client.pem", "tls_key": "client.key"}
        auth = BusAuth(**{option: str(tmp_path / name) for option, name in files.items()}).check()

        async def check() -> None:
            nc = await connect(url, auth)
            await nc.publish("kvgate.tls.probe", b"x")
            await nc.flush()
            await nc.close()
            with pytest.raises(Exception):  # noqa: B017 - no client certificate: the handshake fails
                await connect(url, BusAuth(tls_ca=str(tmp_path / "ca.pem")))

        asyncio.run(check())
