"""Two torch workers serving a checkpoint folder with a real non-ChatML chat template (Llama 3.1's):
the gateway fetches the tokenizer the workers stored on the bus (no shared files), renders the session's
turns as they do, and predicts the second turn's cached tokens exactly as the worker serves them."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from router.chat import HFTokenizer, encode_chat
from tests.engines.test_torch_checkpoint import QWEN2, write_checkpoint
from tests.gateway.conftest import Cluster, http_get
from tests.router.chat_families import write_tokenizer_folder

pytestmark = pytest.mark.slow

FAMILY = "llama-3.1-8b-instruct"


def test_a_templated_session_is_predicted_and_served_with_equal_cached_tokens(
    cluster: Cluster, tmp_path: Path
) -> None:
    folder = tmp_path / "tiny-llama3-chat"
    write_checkpoint(folder, {**QWEN2, "vocab_size": 640})
    write_tokenizer_folder(FAMILY, folder)  # its tokenizer.json, tokenizer_config.json, chat_template.jinja
    tokenizer = HFTokenizer.from_path(folder)
    for i in range(2):
        cluster.worker(f"t{i}", "torch", "--model-path", str(folder))
    cluster.start_gateway()
    cluster.ready(workers=2, timeout_s=180)
    registered = http_get(cluster.gateway.url + "/v1/models")[1]["data"][0]["id"]
    assert registered == folder.name

    sdk = openai.OpenAI(base_url=cluster.gateway.url + "/v1", api_key="none", max_retries=0, timeout=120)
    messages = [
        {"role": "system", "content": "You are a careful coding agent. " * 6},
        {"role": "user", "content": "What is the weather in Paris?"},
    ]
    served: list[tuple[str, int, int, int]] = []
    for _turn in range(2):
        raw = sdk.chat.completions.with_raw_response.create(
            model=registered,
            messages=messages,
            max_tokens=4,
            temperature=0,
            extra_headers={"x-session-affinity": "s1"},
        )
        reply = raw.parse()
        expected = int(raw.headers["x-kvgate-cached-tokens-expected"])
        assert reply.usage.prompt_tokens == len(encode_chat(messages, tokenizer))  # the model's own template
        served.append(
            (raw.headers["x-kvgate-worker"], expected, reply.usage.prompt_tokens_details.cached_tokens,
             reply.usage.prompt_tokens)
        )  # fmt: skip
        messages += [
            {"role": "assistant", "content": reply.choices[0].message.content},
            {"role": "user", "content": "And in Rome?"},
        ]
    (worker1, _, _, prompt1), (worker2, expected2, cached2, _) = served
    assert worker1 == worker2, served
    assert expected2 == cached2, served  # predicted == served, token for token
    assert cached2 >= (prompt1 // 16) * 16, served  # at least the first turn's full blocks

    # the worker renders a plain request (no token ids from the gateway) to the same tokens
    direct = openai.OpenAI(base_url=cluster.workers["t0"].url + "/v1", api_key="none", max_retries=0)
    reply = direct.chat.completions.create(model=registered, messages=messages, max_tokens=1)
    assert reply.usage.prompt_tokens == len(encode_chat(messages, tokenizer))
    log = (tmp_path / "gateway.log").read_text()
    assert f"tokenizer {tokenizer.name} ready" in log  # fetched from the bus by its hash

    # a request the template refuses is a 400 naming the template's own message, at both
    call = {"type": "function", "function": {"name": "f", "arguments": "{}"}}
    refused = [*messages, {"role": "assistant", "content": None, "tool_calls": [call, call]}]
    for client in (sdk, direct):
        with pytest.raises(openai.BadRequestError, match="only supports single tool-calls"):
            client.chat.completions.create(model=registered, messages=refused, max_tokens=1)
