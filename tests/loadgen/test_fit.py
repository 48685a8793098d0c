"""Load sized to its target: the served context read from `/v1/models`, trace rows cut to it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from loadgen.fit import context_budget, fit_trace, served_model
from loadgen.trace import TraceRow
from tests.loadgen.conftest import Served
from tests.serving import serving


def row(session: str | None, turn: int, tokens: int, out: int = 100, at: float = 0.0) -> TraceRow:
    return TraceRow(at, tokens, out, [turn] * -(-tokens // 512), session, turn)


def test_a_session_ends_before_its_first_turn_that_does_not_fit() -> None:
    rows = [
        row("a", 0, 500), row("b", 0, 900, at=1), row("a", 1, 950, out=200, at=2), row(None, 0, 2000, at=3),
        row("a", 2, 1200, at=4), row("a", 3, 990, at=5), row(None, 0, 100, at=6),
    ]  # fmt: skip
    fit = fit_trace(rows, budget=1000)
    assert [(r.session_id, r.turn, r.input_length) for r in fit.rows] == [
        ("a", 0, 500), ("b", 0, 900), ("a", 1, 950), (None, 0, 100),
    ]  # fmt: skip
    # turn 3 of `a` would fit, but it extends turn 2, which does not; the long single row goes alone
    assert fit.left_out == 3 and fit.sessions_cut == 1
    assert [r.output_length for r in fit.rows] == [100, 100, 50, 100]  # a reply is cut to the room left
    assert fit_trace(rows, budget=1000, chars_per_token=4.0).left_out == 0  # 4 characters a token


def test_the_budget_leaves_a_margin_for_the_template_and_the_estimate() -> None:
    assert context_budget(16_384) == 16_384 - 64 - 512
    assert 0 < context_budget(100) < 100 and context_budget(1) == 1


@pytest.fixture
async def models_server() -> AsyncIterator[str]:
    async def models(_request: web.Request) -> web.Response:
        data = [{"id": "small", "max_model_len": 4096}, {"id": "large", "max_model_len": 131_072}]
        return web.json_response({"object": "list", "data": data})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    async with serving(app) as url:
        yield url


async def test_served_model_reads_the_named_or_first_models_context(models_server: str, sse: Served) -> None:
    first = await served_model(models_server, None)
    assert (first.name, first.max_model_len) == ("small", 4096)
    named = await served_model(models_server + "/v1", "key", "large")
    assert (named.name, named.max_model_len) == ("large", 131_072)
    assert (await served_model(sse.url, None)).max_model_len is None  # a server that does not say
    with pytest.raises(ValueError, match="pass --model"):
        await served_model("http://127.0.0.1:9", None, timeout_s=2)
    assert await served_model("http://127.0.0.1:9", None, "m", timeout_s=2) == type(first)("m")
