"""`cache_aware` against the real SGLang router (PyPI `sglang-router` 0.3.2, the `peers` extra; skipped
without it), live: `python -m sglang_router.launch_router --policy cache_aware` in front of three real
`kvgate worker --engine mock` processes, and kvgate's gateway with `cache_aware` in front of three fresh
ones. Both get the same requests, one at a time, with the same settings (SGLang's defaults but
`balance_abs_threshold` 1, so that a few held streams unbalance the load): shared system prompts,
unrelated prompts, a session's next turn, a partial match below the threshold, and a phase where held
streams make one worker busy. Each worker names itself in its answers (`x-kvgate-served-by`, which
both routers pass on).

SGLang lists its workers in its registry's hash order (not the `--worker-urls` order; `GET /workers`
shows it) and kvgate in registration order, and both give ties to the first listed. So each choice is
taken as a position in its router's list: both sequences of positions must equal the one 0.3.2's rules
predict (written out below), and so each other.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import openai
import pytest

from gateway.natsd import free_port
from router.config import RouterConfig
from tests.gateway.conftest import Cluster, Proc, http_get
from tests.gateway.gateways import RunningGateway, running_gateway
from tests.gateway.live_routes import chat, text
from tests.polling import until

pytest.importorskip("sglang_router", reason="the peers extra (sglang-router) is not installed")

pytestmark = pytest.mark.slow

SERVED_BY = "x-kvgate-served-by"
ABS_THRESHOLD = 1  # SGLang's default is 64; with 1, two requests in flight on one worker unbalance


class Side:
    """One router in front of its own workers; `loads` reads that router's own in-flight counts."""

    def __init__(self, url: str, loads: Callable[[], Awaitable[dict[str, int] | None]]) -> None:
        self.client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=120)
        self.loads = loads
        self.served: list[str] = []
        self.cached: list[int | None] = []
        self.held: list[Any] = []

    async def settle(self, busy: int) -> None:
        """Wait until the router counts `busy` requests in flight (the held streams), none other."""

        async def settled() -> bool:
            loads = await self.loads()  # None: the router did not answer this time
            return loads is not None and sum(loads.values()) == busy

        await until(settled, 60.0, f"{busy} requests in flight at the router")

    async def send(self, messages: list[dict[str, Any]]) -> None:
        response = await self.client.chat.completions.with_raw_response.create(
            model="mock", messages=messages, max_tokens=2
        )
        self.served.append(response.headers[SERVED_BY])
        self.cached.append(response.parse().usage.prompt_tokens_details.cached_tokens)

    async def hold(self, messages: list[dict[str, Any]]) -> None:
        stream = await self.client.chat.completions.create(
            model="mock", messages=messages, max_tokens=4000, stream=True
        )
        self.held.append(stream)
        self.served.append(stream.response.headers[SERVED_BY])
        self.cached.append(None)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break

    async def release(self) -> None:
        for stream in self.held:
            await stream.close()
        self.held.clear()

    async def close(self) -> None:
        await self.release()
        await self.client.close()


def follow(messages: list[dict[str, Any]], answer: str, then: str) -> list[dict[str, Any]]:
    """The session's next turn: an assistant answer and a user message after `messages`."""
    return [*messages, *chat(("assistant", text(answer, 160)), ("user", text(then, 160)))]


def scenario() -> list[tuple[str, list[dict[str, Any]], str]]:
    """(name, messages, how): `send` one at a time, `hold` a stream open, `release` every held one."""
    system = text("Sys", 320)
    alpha = chat(("system", system), ("user", text("Alpha", 160)))
    charlie = chat(("system", system), ("user", text("Charlie", 160)))
    juliet = chat(("user", text("Juliet", 1200)))
    return [
        ("alpha", alpha, "send"),
        ("bravo", chat(("system", system), ("user", text("Bravo", 160))), "send"),
        ("unrelated", chat(("user", text("Uniform", 1200))), "send"),
        ("alpha-2", follow(alpha, "Reply", "Again"), "send"),
        ("hotel", chat(("system", system), ("user", text("Hotel", 160))), "hold"),
        ("india", chat(("system", system), ("user", text("India", 160))), "hold"),
        ("charlie", charlie, "send"),
        ("juliet", juliet, "hold"),
        ("delta", chat(("system", system), ("user", text("Delta", 160))), "send"),
        ("", [], "release"),
        ("echo", chat(("system", system), ("user", text("Echo", 160))), "send"),
        ("charlie-2", follow(charlie, "Quote", "Then"), "send"),
        ("kilo", chat(("user", text("Kilo", 1200))), "send"),
        ("juliet-2", follow(juliet, "Vote", "More"), "send"),
        ("lima", chat(("user", text("Juliet", 1200)[:240] + text("Lima", 960))), "send"),
    ]


# SGLang 0.3.2 (balanced: max - min load <= 1 or max <= 1.5 min): the longest match over the text routed
# to each worker wins above 0.3 of the prompt, the worker that first took that text among equals; at or
# below 0.3 the least loaded, the first listed among equals. Imbalanced: the least loaded, first listed.
EXPECTED = {
    "alpha": 0,  # no match; all idle: the first listed
    "bravo": 0,  # the system prompt, 2/3 of the text
    "unrelated": 0,  # no match; all idle: the first listed again
    "alpha-2": 0,  # all of alpha matched
    "hotel": 0,  # held: the system prompt matched; loads 0, 0, 0
    "india": 0,  # held: loads 1, 0, 0 are balanced (1 - 0 is not above 1)
    "charlie": 1,  # loads 2, 0, 0: imbalanced, the first idle one: the second listed
    "juliet": 1,  # held: still imbalanced, the first idle one again
    "delta": 2,  # loads 2, 1, 0: imbalanced, the idle one
    "echo": 0,  # all three hold the system prompt: the first listed took it first
    "charlie-2": 1,  # all of charlie matched, on the second listed only
    "kilo": 0,  # no match; all idle: the first listed
    "juliet-2": 1,  # juliet matched, 4/5 of the text
    "lima": 0,  # juliet's first 240 of 1,200 characters: 0.2 <= 0.3: the least loaded, not its holder
}


async def play(side: Side) -> None:
    held = 0
    for _, messages, how in scenario():
        await side.settle(held)
        if how == "send":
            await side.send(messages)
        elif how == "hold":
            await side.hold(messages)
            held += 1
        else:
            await side.release()
            held = 0


class SglangRouter:
    def __init__(self, worker_urls: dict[str, str], log: Path) -> None:
        """`worker_urls`: worker id -> URL."""
        self.worker_urls = worker_urls
        self.url = f"http://127.0.0.1:{free_port()}"
        argv = [
            "--worker-urls", *worker_urls.values(),
            "--policy", "cache_aware", "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1],
            "--balance-abs-threshold", str(ABS_THRESHOLD), "--log-level", "warn",
            # its metrics listener defaults to a fixed port (29000): two routers on one machine collide
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
        ]  # fmt: skip
        self.process = Proc(argv, self.url, log, module="sglang_router.launch_router")
        self.proc = self.process.proc
        self.log = log

    def wait_ready(self, workers: int, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sglang-router exited: {self.log.read_text()[-2000:]}")
            status, body = http_get(self.url + "/workers")
            if status == 200 and sum(w["is_healthy"] for w in body["workers"]) == workers:
                return
            time.sleep(0.2)
        raise TimeoutError(f"sglang-router not ready: {self.log.read_text()[-2000:]}")

    def workers(self) -> list[str]:
        """Its worker ids in the order it lists them (the order of its picks' `min_by_key`)."""
        status, body = http_get(self.url + "/workers")
        assert status == 200, body
        by_url = {url: wid for wid, url in self.worker_urls.items()}
        return [by_url[w["url"]] for w in body["workers"]]

    async def loads(self) -> dict[str, int] | None:
        """The router's own in-flight count per worker (`GET /workers`)."""
        status, body = await asyncio.to_thread(http_get, self.url + "/workers")
        return {w["url"]: w["load"] for w in body["workers"]} if status == 200 else None

    def stop(self) -> None:
        self.process.stop()


@pytest.fixture
async def sglang(
    cluster: Cluster, nats_url: str, namespace: str, tmp_path: Path
) -> AsyncIterator[SglangRouter]:
    """SGLang's three workers (on a bus namespace of their own: a worker needs one, SGLang reads none of
    it) and the router in front of them; kvgate's three fresh workers on the test's namespace."""
    (tmp_path / "sglang").mkdir()
    theirs = Cluster(nats_url, namespace + "sg", tmp_path / "sglang")
    router: SglangRouter | None = None
    try:
        for i in range(3):
            theirs.worker(f"s{i}")
            cluster.worker(f"k{i}")
        for proc in [*theirs.workers.values(), *cluster.workers.values()]:
            await asyncio.to_thread(proc.wait_http, "/health", 90.0)
        urls = {f"s{i}": theirs.workers[f"s{i}"].url for i in range(3)}
        router = SglangRouter(urls, tmp_path / "sglang-router.log")
        await asyncio.to_thread(router.wait_ready, 3)
        yield router
    finally:
        if router is not None:
            router.stop()
        theirs.stop()


def kvgate_loads(gw: RunningGateway) -> Callable[[], Awaitable[dict[str, int] | None]]:
    async def loads() -> dict[str, int] | None:
        return {w: gw.router.load.requests(w) for w in gw.router.workers()}

    return loads


async def test_cache_aware_chooses_as_sglang_router_does(
    sglang: SglangRouter, nats_url: str, namespace: str
) -> None:
    config = RouterConfig(balance_abs_threshold=ABS_THRESHOLD)
    async with running_gateway(nats_url, namespace, "gw", policy="cache_aware", router_config=config) as gw:
        await gw.wait_ready(3, 90.0)
        peer, ours = Side(sglang.url, sglang.loads), Side(gw.url, kvgate_loads(gw))
        try:
            await play(peer)
            await play(ours)
        finally:
            await peer.close()
            await ours.close()
        ours_listed = gw.router.workers()
    theirs_listed = await asyncio.to_thread(sglang.workers)
    names = [name for name, _, how in scenario() if how != "release"]
    assert dict(zip(names, [theirs_listed.index(w) for w in peer.served], strict=True)) == EXPECTED
    assert dict(zip(names, [ours_listed.index(w) for w in ours.served], strict=True)) == EXPECTED
    assert ours.cached == peer.cached  # the same choices, so fresh workers cached the same prefixes
