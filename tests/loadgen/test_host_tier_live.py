"""The host tier live: `kvgate up --engine mock --worker-args "--host-blocks N"` and an agentic
`kvgate loadgen` run. A session's blocks go to the host tier while it waits on a long tool call and come
back before its next turn (the KV events on the bus say so, tier by tier, and the worker counts the
blocks it prefetched), and the cached tokens are reported with their tier: per request by the worker,
summed in loadgen's results, and in the gateway's and the worker's /metrics."""

from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest

from router.protocol import BlockRemoved, BlockStored, KvEventBatch, Subjects, WorkerRegistration, decode
from tests.kvgate_up import running_kvgate_up_async
from tests.loadgen.conftest import run_loadgen

# One worker whose device (384 blocks of 16 tokens) holds less than two of these sessions' contexts (a
# shared ~2,300-token system prompt and tools, then 2,000 tokens and more of each session's own), behind
# it a host tier of 2,048 blocks. Two sessions run at once: each one's turn pushes the other's blocks off the
# device, to the host. The router is told to expect a tool call back after 3 s and to prefetch 1 s
# before: the tools take 6 s.
WORKER_ARGS = "--num-blocks 384 --host-blocks 2048 --speedup 4"
ROUTER = ("--router-set", "host_prefetch=true", "--router-set", "think_default_s=3")
LOAD = [
    "--workload", "agentic", "--concurrency", "2", "--turns", "const:3", "--tool-time", "const:6",
    "--agent-types", "1", "--system-len", "const:2400", "--task-len", "const:2000",
    "--tool-result-len", "const:100", "--output-len", "const:16", "--requests", "6", "--duration", "90",
    "--no-progress",
]  # fmt: skip


def scrape(url: str) -> dict[str, float]:
    """A Prometheus page as {`name{labels}`: value}."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r"^(\S+) (\S+)$", text, re.M) if not m[1].startswith("#")}


async def scrape_until(url: str, name: str, value: float, timeout_s: float = 30.0) -> dict[str, float]:
    """The page once `name` reads `value` (or the last one, after `timeout_s`)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        page = await asyncio.to_thread(scrape, url)
        if page.get(name) == value or asyncio.get_running_loop().time() > deadline:
            return page
        await asyncio.sleep(0.2)


class TierTap:
    """Every KV event batch on the bus, replayed per tier: what each hash did, in order."""

    def __init__(self) -> None:
        self.moves: dict[int, list[str]] = {}  # block hash -> "+device", "-device", "+host", ...

    async def on_batch(self, msg: Any) -> None:
        for event in decode(msg.data, KvEventBatch).events:
            if isinstance(event, BlockStored | BlockRemoved):
                sign = "+" if isinstance(event, BlockStored) else "-"
                for block_hash in event.block_hashes:
                    self.moves.setdefault(block_hash, []).append(sign + event.tier)

    def went_to_host_and_back(self) -> set[int]:
        """Blocks stored on the host and, after that, on the device again."""
        back = set()
        for block_hash, moves in self.moves.items():
            if "+host" in moves and "+device" in moves[moves.index("+host") :]:
                back.add(block_hash)
        return back


@pytest.mark.slow
async def test_a_session_goes_to_host_during_its_tool_call_and_comes_back(
    nats_url: str, namespace: str, tmp_path: Path
) -> None:
    tap = TierTap()
    nc = await nats.connect(nats_url)
    try:
        await nc.subscribe(Subjects(namespace).kv("w").removesuffix(".w") + ".*", cb=tap.on_batch)
        up = ["--engine", "mock", "--workers", "1", "--nats", nats_url, "--namespace", namespace]
        up += ["--worker-args", WORKER_ARGS, *ROUTER]
        async with running_kvgate_up_async(up, tmp_path / "up.log") as url:
            kv = await nc.jetstream().key_value(Subjects(namespace).registry_bucket)
            worker_url = decode((await kv.get((await kv.keys())[0])).value, WorkerRegistration).url
            run = await run_loadgen(["--url", url, *LOAD, "--out", str(tmp_path / "run")], timeout=240)
            assert run.returncode == 0, run.stderr[-2000:]
            summary = run.summary()
            # the gateway and the worker count an answer once it is sent: the last may lag the client
            prompt = summary["prompt_tokens"]
            gateway = await scrape_until(url, "kvgate_prompt_tokens_total", prompt)
            worker = await scrape_until(worker_url, "kvgate_worker_prompt_tokens_total", prompt)
        await nc.flush()
    finally:
        with contextlib.suppress(Exception):
            await nc.close()

    assert summary["errors"] == 0 and summary["completed"] == 6, summary  # 2 sessions x 3 turns
    # Blocks went to the host and came back to the device, and some came back ahead of their turn.
    assert any("+host" in moves for moves in tap.moves.values())
    assert tap.went_to_host_and_back()
    assert worker["kvgate_worker_prefetched_blocks"] > 0
    # Cached tokens by tier: loadgen's results, the gateway's and the worker's counters agree.
    device, host = summary["device_cached_tokens"], summary["host_cached_tokens"]
    assert device > 0 and device + host == summary["cached_tokens"]
    counters = {"kvgate_tier_cached_tokens_total": gateway, "kvgate_worker_cached_tokens_total": worker}
    for name, page in counters.items():
        assert (page[name + '{tier="device"}'], page[name + '{tier="host"}']) == (device, host)
    results = msgspec.json.decode((tmp_path / "run" / "results.json").read_bytes())
    assert sum(r["host_cached_tokens"] for r in results["requests"]) == host
