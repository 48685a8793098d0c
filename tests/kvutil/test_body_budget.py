"""The body budget over real HTTP: a body that would pass the bytes being read at once is refused
before it is read, a body that stops arriving gets 408 at the deadline, and every reservation comes
back however its body ended."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from kvutil.body_budget import BodyBudget, BodyRefused
from tests.polling import until
from tests.serving import serving
from tests.slow_body import SlowBody

BODY = 1 << 20  # the per-body cap


@contextlib.asynccontextmanager
async def server(budget: BodyBudget) -> AsyncIterator[str]:
    async def read(request: web.Request) -> web.Response:
        try:
            body = await budget.read(request)
        except BodyRefused as exc:
            return web.json_response({"error": exc.message}, status=exc.status)
        return web.json_response({"bytes": len(body)})

    app = web.Application(client_max_size=BODY)
    app.router.add_post("/", read)
    async with serving(app, handler_cancellation=True) as url:
        yield url


async def post(url: str, size: int) -> int:
    async with aiohttp.ClientSession() as http, http.post(url + "/", data=b"x" * size) as resp:
        return resp.status


async def test_a_body_past_the_budget_is_refused_before_it_is_read_and_the_budget_comes_back() -> None:
    budget = BodyBudget(2 * BODY, BODY, timeout_s=60.0)
    async with server(budget) as url:
        slow = [await SlowBody.open(url, "/", BODY, b"x" * 10) for _ in range(2)]
        await until(lambda: budget.reserved == 2 * BODY)
        assert await post(url, 100) == 503  # refused at once, not queued behind the slow bodies
        await slow[0].send(b"x" * (BODY - 10))
        status, answer = await slow[0].answer()
        assert status == 200 and json.loads(answer) == {"bytes": BODY}
        assert await post(url, 100) == 200  # its share came back
        await slow[1].close()  # a client that leaves mid-body frees its share too
        await until(lambda: budget.reserved == 0)
        await slow[0].close()


async def test_a_body_that_stops_arriving_gets_408_and_frees_its_share() -> None:
    budget = BodyBudget(2 * BODY, BODY, timeout_s=0.5)
    async with server(budget) as url:
        slow = await SlowBody.open(url, "/", 1000, b"x" * 10)
        status, answer = await slow.answer()
        assert status == 408 and "did not arrive within 0.5 s" in json.loads(answer)["error"]
        assert budget.reserved == 0
        await slow.close()


async def test_a_body_of_unknown_length_reserves_the_whole_cap() -> None:
    budget = BodyBudget(BODY + 1000, BODY, timeout_s=60.0)
    async with server(budget) as url:
        slow = await SlowBody.open(url, "/", None, b"x" * 10)  # chunked: no length declared
        await until(lambda: budget.reserved == BODY)
        assert await post(url, 100) == 200  # 1,000 bytes of the budget are left
        assert await post(url, 2000) == 503
        await slow.send(b"0\r\n\r\n")  # the last chunk
        status, answer = await slow.answer()
        assert status == 200 and json.loads(answer) == {"bytes": 10}
        assert budget.reserved == 0
        await slow.close()


def test_the_total_must_hold_one_body() -> None:
    with pytest.raises(ValueError, match="must hold one body"):
        BodyBudget(BODY - 1, BODY, timeout_s=1.0)
