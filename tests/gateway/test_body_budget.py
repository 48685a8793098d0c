"""The gateway's bodies in transit, bounded (kvutil/body_budget.py): a real gateway over real NATS
refuses a body past its budget with an OpenAI-style 503 before reading it, and answers a body that
stops arriving with a 408; the real `openai` client sees the error it expects."""

from __future__ import annotations

import json

import openai
import pytest

from tests.gateway.gateways import running_gateway
from tests.polling import until
from tests.slow_body import SlowBody

BODY = 1 << 20
CHAT = "/v1/chat/completions"


async def test_a_body_past_the_budget_gets_503_json_and_a_stalled_one_408(
    nats_url: str, namespace: str
) -> None:
    limits = {"max_body_bytes": BODY, "body_budget_bytes": 2 * BODY, "body_timeout_s": 2.0}
    async with running_gateway(nats_url, namespace, "gw-bodies", **limits) as gw:
        bodies = gw.gateway.turns.bodies
        slow = [await SlowBody.open(gw.url, CHAT, BODY) for _ in range(2)]
        await until(lambda: bodies.reserved == 2 * BODY)
        sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0)
        with pytest.raises(openai.APIStatusError) as refused:
            await sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        await sdk.close()
        assert refused.value.status_code == 503
        assert refused.value.response.headers["retry-after"] == "1"
        assert refused.value.body["code"] == "body_refused"  # type: ignore[index]
        for stalled in slow:  # neither sends the rest: each is answered at its deadline
            status, answer = await stalled.answer()
            error = json.loads(answer)["error"]
            assert status == 408 and error["code"] == "body_refused" and "2 s" in error["message"]
            await stalled.close()
        assert bodies.reserved == 0
