"""`kvgate worker` as a real process against a real nats-server: cache hits reported over HTTP, the
stored events on the bus carry router.hashing of the prompt, registration, load, dumps, pins,
a NATS outage, and a clean shutdown."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import nats
import openai
import pytest
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, NotFoundError

from gateway.natsd import NatsServer, free_port
from router.chat import ByteTokenizer, encode_chat
from router.hashing import block_hashes
from router.protocol import (
    MAX_BLOCK_MS,
    BlockStored,
    KvEventBatch,
    KvStateDump,
    LoadReport,
    PinHint,
    StateDumpRequest,
    Subjects,
    WorkerRegistration,
    decode,
    encode,
)
from tests.engines.kv_replay import ReplayedCache
from tests.polling import until

pytestmark = pytest.mark.slow

BLOCK = 16
LONG_PROMPT = [
    {"role": "system", "content": "You are a coding agent. " * 20},
    {"role": "user", "content": "Fix the failing test in tests/test_parser.py, then run the suite."},
]


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[str]
    url: str
    worker_id: str
    ready_line: str

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)  # a torch worker finishes its step first: slow on a loaded machine
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_worker(
    nats_url: str, namespace: str, *extra: str, engine: str = "mock", port: int | None = None
) -> WorkerProcess:
    """`port` 0: the system's choice, read from the ready line."""
    port = free_port() if port is None else port
    worker_id = f"w{port or uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "gateway.cli", "worker", "--engine", engine, "--nats", nats_url]
    cmd += ["--port", str(port), "--namespace", namespace, "--worker-id", worker_id, "--num-blocks", "256"]
    cmd += ["--block-size", str(BLOCK), "--log-level", "WARNING", *extra]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    deadline = time.monotonic() + 120
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line and proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode}")
        if " ready on " in line:
            os.set_blocking(proc.stdout.fileno(), False)  # nobody reads the rest: never block on it
            url = line.split(" ready on ", 1)[1].split()[0] if port == 0 else f"http://127.0.0.1:{port}"
            return WorkerProcess(proc, url, worker_id, line)
    proc.kill()
    raise AssertionError("worker did not become ready")


@pytest.fixture
def worker(nats_url: str, namespace: str) -> Iterator[WorkerProcess]:
    process = start_worker(nats_url, namespace, "--speedup", "1000")
    yield process
    process.stop()


class BusTap:
    """Everything a gateway would see of one namespace."""

    def __init__(self, nc: nats.NATS, subjects: Subjects) -> None:
        self.nc = nc
        self.subjects = subjects
        self.batches: list[KvEventBatch] = []
        self.loads: list[LoadReport] = []

    async def start(self) -> None:
        js = self.nc.jetstream()
        for attempt in range(100):  # the worker creates the stream once connected
            try:
                await js.subscribe(
                    self.subjects.kv_all, stream=self.subjects.kv_stream, ordered_consumer=True, cb=self._kv
                )
                break
            except (NotFoundError, nats.errors.TimeoutError):  # no stream yet; a slow JetStream API
                if attempt == 99:
                    raise
                await asyncio.sleep(0.1)
        await self.nc.subscribe(self.subjects.load_all, cb=self._load)

    async def _kv(self, msg: nats.aio.msg.Msg) -> None:
        self.batches.append(decode(msg.data, KvEventBatch))

    async def _load(self, msg: nats.aio.msg.Msg) -> None:
        self.loads.append(decode(msg.data, LoadReport))

    def stored_hashes(self) -> list[int]:
        return [
            h for b in self.batches for e in b.events if isinstance(e, BlockStored) for h in e.block_hashes
        ]


@pytest.fixture
async def bus(nats_url: str, namespace: str) -> AsyncIterator[BusTap]:
    nc = await nats.connect(nats_url)
    tap = BusTap(nc, Subjects(namespace))
    await tap.start()
    yield tap
    await nc.close()


async def registry_entry(js: Any, bucket: str, worker_id: str, timeout_s: float = 30.0) -> tuple[Any, Any]:
    """The registry bucket and the worker's entry: /health answers before its NATS side registered."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            kv = await js.key_value(bucket)
            return kv, await kv.get(worker_id)
        except (BucketNotFoundError, KeyNotFoundError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.05)


def read_url(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read()


def api(worker: WorkerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{worker.url}/v1", api_key="unused", max_retries=0, timeout=60)


async def check_same_prompt_twice(worker: WorkerProcess, bus: BusTap, max_tokens: int) -> None:
    client = api(worker)
    prompt = encode_chat(LONG_PROMPT, ByteTokenizer())
    full_blocks = len(prompt) // BLOCK
    first = await client.chat.completions.create(model="any", messages=LONG_PROMPT, max_tokens=max_tokens)
    assert first.usage.prompt_tokens == len(prompt)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    second = await client.chat.completions.create(model="any", messages=LONG_PROMPT, max_tokens=max_tokens)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert (full_blocks - 1) * BLOCK <= cached <= full_blocks * BLOCK and cached < len(prompt)
    await until(lambda: len(bus.stored_hashes()) >= full_blocks)
    assert bus.stored_hashes()[:full_blocks] == block_hashes(prompt, BLOCK)
    assert [b.seq for b in bus.batches] == list(range(len(bus.batches)))
    assert {b.worker_id for b in bus.batches} == {worker.worker_id}


async def test_same_prompt_twice_mock(worker: WorkerProcess, bus: BusTap) -> None:
    await check_same_prompt_twice(worker, bus, max_tokens=4)


async def test_same_prompt_twice_torch(nats_url: str, namespace: str) -> None:
    """The torch worker, with a host tier: cache hits as the mock's, and a load report that announces
    the host link's time per block it measured at startup (the router prices a host hit at it), and,
    asynchronous by default, that its copies stall the step: a real runner's compute waits for them."""
    pytest.importorskip("torch")
    process = start_worker(nats_url, namespace, "--host-blocks", "64", engine="torch")
    nc = await nats.connect(nats_url)
    try:
        bus = BusTap(nc, Subjects(namespace))
        await bus.start()
        await check_same_prompt_twice(process, bus, max_tokens=2)
        assert process.worker_id in process.ready_line
        await until(lambda: bool(bus.loads))
        load = bus.loads[-1]
        assert load.host_blocks == 64 and not load.onboard_async
        assert 0 < load.host_block_ms <= MAX_BLOCK_MS
    finally:
        await nc.close()
        assert process.stop() == 0


async def test_port_0_listens_where_the_system_put_it(nats_url: str, namespace: str) -> None:
    """A port chosen by the system at the bind, not picked beforehand and bound later (by then another
    process may hold it): the ready line and the registration name the port actually bound."""
    worker = start_worker(nats_url, namespace, port=0)
    try:
        assert not worker.url.endswith(":0")
        assert read_url(worker.url + "/health")
        nc = await nats.connect(nats_url)
        try:
            subjects = Subjects(namespace)
            _kv, entry = await registry_entry(nc.jetstream(), subjects.registry_bucket, worker.worker_id)
            assert decode(entry.value, WorkerRegistration).url == worker.url
        finally:
            await nc.close()
    finally:
        assert worker.stop() == 0


async def test_registration_load_dump_pin_and_clean_shutdown(
    worker: WorkerProcess, bus: BusTap, nats_url: str, namespace: str
) -> None:
    subjects = Subjects(namespace)
    nc = bus.nc
    kv, entry = await registry_entry(nc.jetstream(), subjects.registry_bucket, worker.worker_id)
    registration = decode(entry.value, WorkerRegistration)
    assert (
        registration.url == worker.url and registration.block_size == BLOCK and registration.engine == "mock"
    )
    assert registration.num_blocks == 256 and abs(registration.heartbeat_ts - time.time()) < 5
    first_revision = entry.revision
    await until(lambda: len(bus.loads) >= 5)  # 10 Hz
    assert bus.loads[-1].total_blocks == 256 and bus.loads[-1].worker_id == worker.worker_id
    deadline = time.monotonic() + 30  # the heartbeat (every 1 s) rewrites the entry
    while (await kv.get(worker.worker_id)).revision == first_revision:
        assert time.monotonic() < deadline, "the heartbeat did not rewrite the registry entry"
        await asyncio.sleep(0.1)

    client = api(worker)
    await client.chat.completions.create(model="any", messages=LONG_PROMPT, max_tokens=3)
    await until(lambda: bus.stored_hashes() != [])
    reply = await nc.request(subjects.dump(worker.worker_id), encode(StateDumpRequest("test")), timeout=5)
    dump = decode(reply.data, KvStateDump)
    assert dump.worker_id == worker.worker_id and dump.epoch == registration.epoch
    await until(lambda: any(b.seq == dump.seq for b in bus.batches))
    replay = ReplayedCache()
    for batch in bus.batches:
        if batch.seq <= dump.seq:
            replay.apply(batch.events)
    assert replay.blocks == {b.block_hash: b.parent_hash for b in dump.blocks}

    # a pin on the prompt's blocks keeps them through a flood of other prompts (256 blocks, 2 of 3 cycles)
    prompt_hashes = block_hashes(encode_chat(LONG_PROMPT, ByteTokenizer()), BLOCK)
    await nc.publish(subjects.pin(worker.worker_id), encode(PinHint("sess", prompt_hashes, 60.0)))
    # The worker takes its bus messages in the order they arrive, each into its engine loop in turn:
    # the answer to a dump asked after the pin says the pin is in place before the flood starts.
    await nc.request(subjects.dump(worker.worker_id), encode(StateDumpRequest("test")), timeout=30)
    for i in range(12):
        flood = [{"role": "user", "content": f"{i} other work " * 40}]
        await client.chat.completions.create(model="any", messages=flood, max_tokens=1)
    again = await client.chat.completions.create(model="any", messages=LONG_PROMPT, max_tokens=1)
    assert again.usage.prompt_tokens_details.cached_tokens >= (len(prompt_hashes) - 1) * BLOCK

    assert worker.stop() == 0
    with pytest.raises(KeyNotFoundError):
        await kv.get(worker.worker_id)


async def test_worker_serves_through_a_nats_outage_and_reconnects(namespace: str) -> None:
    with NatsServer() as server:
        process = start_worker(server.url, namespace, "--speedup", "1000")
        try:
            client = api(process)
            server.stop()
            done = await client.chat.completions.create(model="any", messages=LONG_PROMPT, max_tokens=2)
            assert done.usage.completion_tokens == 2  # HTTP does not wait on the bus
            server.start()
            nc = await nats.connect(server.url)
            try:
                tap = BusTap(nc, Subjects(namespace))
                await tap.start()
                await until(lambda: len(tap.loads) >= 3, timeout_s=20)
                kv = await nc.jetstream().key_value(Subjects(namespace).registry_bucket)
                await eventually_async(lambda: kv.get(process.worker_id), timeout_s=10)
            finally:
                await nc.close()
        finally:
            assert process.stop() == 0


async def eventually_async(call: Callable[[], Awaitable[object]], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            await call()
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


async def test_a_host_tier_takes_evicted_blocks_and_serves_them_back(nats_url: str, namespace: str) -> None:
    """A worker with a small device cache and a host tier: a session's prompt is pushed off the device by
    other prompts, its blocks reach the host (events on the bus with tier "host"), and its next turn
    onboards them, reported as host-cached tokens."""
    process = start_worker(nats_url, namespace, "--speedup", "1000", "--host-blocks", "512")
    nc = await nats.connect(nats_url)
    try:
        bus = BusTap(nc, Subjects(namespace))
        await bus.start()
        client = api(process)
        prompt = encode_chat(LONG_PROMPT, ByteTokenizer())
        await client.chat.completions.create(model="any", messages=LONG_PROMPT, max_tokens=2)
        for i in range(4):  # 4 x ~100 blocks through a 256-block device cache
            other = [{"role": "user", "content": f"{i} unrelated work " * 90}]
            await client.chat.completions.create(model="any", messages=other, max_tokens=2)
        chain = block_hashes(prompt, BLOCK)

        def on_host() -> set[int]:
            held: set[int] = set()
            for batch in bus.batches:
                for event in batch.events:
                    if getattr(event, "tier", "device") == "host":
                        hashes = set(event.block_hashes)
                        held = held | hashes if isinstance(event, BlockStored) else held - hashes
            return held

        await until(lambda: chain[0] in on_host())
        again = await client.chat.completions.create(model="any", messages=LONG_PROMPT, max_tokens=2)
        details = again.usage.prompt_tokens_details
        host_cached = (details.model_extra or {}).get("host_cached_tokens", 0)
        assert host_cached >= BLOCK and details.cached_tokens >= host_cached
        await until(lambda: chain[0] not in on_host())  # onboarded: off the host, on the device
        # the worker's /metrics counts the cached tokens by tier (counted before the answer is sent)
        metrics = (await asyncio.to_thread(read_url, process.url + "/metrics")).decode()
        host_total = re.search(r'^kvgate_worker_cached_tokens_total\{tier="host"\} (\S+)$', metrics, re.M)
        assert host_total is not None and float(host_total[1]) >= host_cached
    finally:
        await nc.close()
        assert process.stop() == 0


def test_the_worker_flags_reach_the_engine_config() -> None:
    import argparse

    from engines.serve import add_arguments, engine_config

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = engine_config(parser.parse_args(["--host-blocks", "64", "--preempt-for-prompts"]))
    assert config.host_blocks == 64 and config.preempt_for_prompts
    assert not engine_config(parser.parse_args([])).preempt_for_prompts  # off by default
    config = engine_config(parser.parse_args(["--priority-scheduling", "--priority-threshold", "3"]))
    assert config.priority_scheduling and config.priority_threshold == 3
    assert not engine_config(parser.parse_args([])).priority_scheduling
    for form in ("sync", "async", "layerwise"):
        config = engine_config(parser.parse_args(["--host-blocks", "64", f"--onboard-{form}"]))
        assert config.onboarding == form
    assert engine_config(parser.parse_args([])).onboarding == "async"  # vLLM's offloading connector's


def test_the_onboarding_flags_name_one_form_and_sync_is_the_step_stalling_engine(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--onboard-sync` / `--onboard-async` / `--onboard-layerwise` are one exclusive group: asynchronous
    by default, `--onboard-sync` the engine whose step waits for its copies (no load it announces is
    asynchronous), and two forms at once exit 2 with one error line."""
    import argparse

    from engines.engine import Engine
    from engines.mock import MockRunner
    from engines.serve import add_arguments, engine_config

    parser = argparse.ArgumentParser(prog="kvgate worker")
    add_arguments(parser)
    for flags, onboard_async in (([], True), (["--onboard-async"], True), (["--onboard-sync"], False)):
        config = engine_config(parser.parse_args(["--host-blocks", "64", *flags]))
        engine = Engine(config, MockRunner(config.num_blocks, config.block_size))
        assert engine.scheduler.onboard_async is onboard_async
        assert engine.load().onboard_async is onboard_async
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args(["--onboard-sync", "--onboard-layerwise"])
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert errors == [
        "kvgate worker: error: argument --onboard-layerwise: not allowed with argument --onboard-sync"
    ]
