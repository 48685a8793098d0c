"""`kvgate up` as a user runs it: one subprocess, the official `openai` client, then SIGTERM stops
everything it started."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anthropic
import nats as nats_client
import openai
import pytest

from gateway.bus_plan import BusPlan
from gateway.natsd import free_port
from tests.processes import children_of, left_running

pytestmark = pytest.mark.slow


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def test_kvgate_up_serves_the_openai_client_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "up.log").open("wb")
    up = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "up", "--engine", "mock", "--workers", "2", "--port", str(port),
         "--worker-args", "--speedup 1000"],
        stdout=subprocess.PIPE, stderr=log, start_new_session=True,
    )  # fmt: skip
    try:
        banner = []
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = up.stdout.readline().decode()
            assert line, f"kvgate up exited: {(tmp_path / 'up.log').read_text()[-3000:]}"
            banner.append(line)
            if "curl" in line:
                break
        text = "".join(banner)
        url = f"http://127.0.0.1:{port}"
        assert url in text and "/v1/chat/completions" in text
        model = text.split('"model": "')[1].split('"')[0]
        children = children_of(up.pid)
        assert len(children) >= 3  # nats-server and two workers

        sdk = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        messages = [{"role": "user", "content": "Hello!"}]
        assert sdk.chat.completions.create(model=model, messages=messages, max_tokens=3).choices[0].message
        chunks = list(sdk.chat.completions.create(model=model, messages=messages, max_tokens=3, stream=True))
        assert chunks[-1].choices[0].finish_reason == "length"

        async def async_turns() -> None:
            client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
            reply = await client.chat.completions.create(model=model, messages=messages, max_tokens=3)
            assert reply.usage.completion_tokens == 3
            stream = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=3, stream=True
            )
            assert [c async for c in stream][-1].choices[0].finish_reason == "length"
            await client.close()

        asyncio.run(async_turns())

        # the agents' APIs: Anthropic Messages, and a Responses chain kept in the bus's bucket
        # (which the gateway's generated bus user may create and write)
        claude = anthropic.Anthropic(base_url=url, api_key="none", max_retries=0)
        reply = claude.messages.create(model=model, max_tokens=3, messages=messages)
        assert reply.type == "message" and reply.usage.output_tokens == 3
        first = sdk.responses.create(model=model, input="Hello!", max_output_tokens=3)
        second = sdk.responses.create(model=model, input="Again.", previous_response_id=first.id)
        assert second.usage.input_tokens > first.usage.input_tokens
        gateway_log = (tmp_path / "up.log").read_text()
        assert "joined" in gateway_log and "response store:" not in gateway_log  # its log; no bucket warning

        # a crashed worker is restarted (same id, new process) and serves again
        worker0 = next(pid for pid in children if "worker-0" in cmdline(pid))
        os.kill(worker0, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while True:
            restarted = [pid for pid in children_of(up.pid) if "worker-0" in cmdline(pid) and pid != worker0]
            if restarted:
                break
            assert time.monotonic() < deadline, "the crashed worker was not restarted"
            time.sleep(0.2)
        children = children_of(up.pid)
        sdk.with_options(timeout=30).models.list()
        assert sdk.chat.completions.create(model=model, messages=messages, max_tokens=2).choices[0].message

        up.send_signal(signal.SIGTERM)
        assert up.wait(30) == 0
        assert not left_running(children), "kvgate up left processes running"
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
        log.close()


def test_ctrl_c_while_the_workers_start_stops_kvgate_up_without_an_error() -> None:
    """Ctrl-C before the workers are ready is a stop: exit 0, everything it started stopped, and no
    "not ready within 180 s" (it said so, seconds after the start)."""
    up = subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "up", "--engine", "mock", "--workers", "2",
         "--port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip
    try:
        assert up.stderr is not None and up.stdout is not None
        err: list[str] = []
        while True:  # the gateway listens at once; the workers are processes still importing
            line = up.stderr.readline().decode()
            assert line, "kvgate up exited: " + "".join(err)
            err.append(line)
            if "gateway listening" in line:
                break
        children = children_of(up.pid)
        up.send_signal(signal.SIGINT)
        out, rest = up.communicate(timeout=60)
        text = "".join(err) + rest.decode()
        assert up.returncode == 0, text
        assert "kvgate is up" not in out.decode(), "the workers were ready before the signal: no test"
        assert "not ready" not in text and "ERROR" not in text, text
        assert not left_running(children), "kvgate up left processes running"
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()


def test_the_embedded_nats_is_restarted_after_kill_9_with_its_credentials() -> None:
    """`kvgate up`'s bus: a nats-server killed with -9 comes back on its port, and the generated
    credentials still work; an unauthenticated client is refused."""
    args = argparse.Namespace(nats=None, nats_no_auth=False, namespace="kvgate")
    plan = BusPlan.make(args, ["worker-0"])
    try:
        assert plan.server is not None and plan.gateway.password and plan.workers["worker-0"].password
        proc = plan.server._proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

        async def recover() -> None:
            deadline = time.monotonic() + 60  # the first restart comes after 1 s, the next after 2 s
            while not plan.server.running:
                await plan.watch()
                assert time.monotonic() < deadline, "nats-server was not restarted"
                await asyncio.sleep(0.2)
            nc = await nats_client.connect(plan.url, allow_reconnect=False, **plan.gateway.connect_options())
            await nc.close()
            with pytest.raises(Exception):  # noqa: B017 - refused: no credentials
                await nats_client.connect(plan.url, allow_reconnect=False, connect_timeout=2)

        asyncio.run(recover())
    finally:
        plan.close()


def test_a_worker_that_refuses_its_arguments_stops_kvgate_up_with_its_error() -> None:
    """A bad `--worker-args` fails the same way on every restart: `kvgate up` says why and exits 2
    instead of restarting the workers forever, and leaves nothing running."""
    up = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "up", "--engine", "mock", "--workers", "2",
         "--port", str(free_port()), "--worker-args", "--host-blocks -1"],
        capture_output=True, timeout=60, start_new_session=True,
    )  # fmt: skip
    err = up.stderr.decode()
    assert up.returncode == 2, err
    assert "--host-blocks must not be negative" in err
    assert "refused its arguments" in err
    assert "kvgate is up" not in up.stdout.decode()
    assert "restarting" not in err


def test_up_passes_its_gateway_flags_to_the_gateway_it_runs() -> None:
    """`kvgate up --no-split-turns` (and the flags beside it) reach the gateway's config."""
    from gateway.up import add_arguments, gateway_config
    from kvutil.bus_auth import BusAuth
    from router.config import RouterConfig

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    bus = BusPlan("nats://127.0.0.1:4222", BusAuth(user="gateway", password="secret"), {}, None)
    default = gateway_config(parser.parse_args([]), bus, RouterConfig(), 3.0)
    assert default.split_turns and default.bus_auth.user == "gateway"
    args = parser.parse_args(["--no-split-turns", "--policy", "kv_overlap", "--api-key", "k1"])
    config = gateway_config(args, bus, RouterConfig(), 7.5)
    assert not config.split_turns
    assert (config.policy, config.api_keys, config.stale_after_s) == ("kv_overlap", ("k1",), 7.5)
    assert config.nats_url == "nats://127.0.0.1:4222" and config.gateway_id == "gateway-up"


def test_up_lets_each_worker_bind_a_port_the_system_chooses() -> None:
    """`--port 0` for every worker: a port picked by the supervisor is bound only after the child's
    imports (seconds on a loaded host), and another process may take it first; restarted on the same
    port, the worker would fail for as long as that process holds it. The worker registers the port
    it got, which is all the gateway needs."""
    from gateway.supervisor import Supervisor
    from gateway.up import add_arguments
    from kvutil.bus_auth import BusAuth

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    workers = {"w0": BusAuth(user="w0", password="a"), "w1": BusAuth(user="w1", password="b")}
    bus = BusPlan("nats://127.0.0.1:4222", BusAuth(user="gateway", password="secret"), workers, None)
    supervisor = Supervisor(parser.parse_args(["--engine", "mock"]), bus)
    ports = [child.argv[child.argv.index("--port") + 1] for child in supervisor.children]
    assert ports == ["0", "0"]
