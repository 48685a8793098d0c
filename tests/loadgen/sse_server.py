"""A minimal zero-latency OpenAI streaming server for loadgen tests and the loadgen throughput check.

It streams `max_tokens` one-character tokens at once, reports usage with `cached_tokens` from a
per-character-block prefix cache (so cache hit rates mean something), and keeps the headers of every
request so a test can check what the loadgen sent. Run alone: `python tests/loadgen/sse_server.py --port P`.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import xxhash
from aiohttp import web

BLOCK = 16  # characters per cache block
MAX_TOKENS = 4096


def _blocks(text: str) -> list[int]:
    hashes, parent = [], 0
    for i in range(0, len(text) - BLOCK + 1, BLOCK):
        parent = xxhash.xxh3_64_intdigest(text[i : i + BLOCK].encode(), seed=parent)
        hashes.append(parent)
    return hashes


class SseServer:
    def __init__(self, fail_every: int = 0) -> None:
        self.requests: list[dict[str, Any]] = []  # headers and times of each request
        self.cache: set[int] = set()
        self.fail_every = fail_every
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_get("/v1/models", self.models)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "mock-model", "object": "model"}]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(
            {
                "session": request.headers.get("x-session-id"),
                "tool_call": request.headers.get("x-kvgate-tool-call"),
                "arrived": time.time(),
                "messages": len(body["messages"]),
                "content_chars": sum(len(m.get("content") or "") for m in body["messages"]),
            }
        )
        if self.fail_every and len(self.requests) % self.fail_every == 0:
            error = {"message": "injected failure", "type": "server_error", "param": None, "code": None}
            return web.json_response({"error": error}, status=503)
        prompt = json.dumps(body.get("tools")) + "".join(
            f"{m['role']}:{m.get('content') or ''}{json.dumps(m.get('tool_calls'))}" for m in body["messages"]
        )
        blocks = _blocks(prompt)
        hit = 0
        for h in blocks:
            if h not in self.cache:
                break
            hit += 1
        self.cache.update(blocks)
        n = min(int(body.get("max_tokens") or 16), MAX_TOKENS)
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        head = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}
        events = [{**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}]
        events += [{**head, "choices": [{"index": 0, "delta": {"content": "x"}}]} for _ in range(n)]
        events.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        usage = {"prompt_tokens": len(prompt), "completion_tokens": n, "total_tokens": len(prompt) + n}
        usage["prompt_tokens_details"] = {"cached_tokens": hit * BLOCK}
        events.append({**head, "choices": [], "usage": usage})
        payload = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        await response.write(payload.encode())
        await response.write_eof()
        return response


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(SseServer().app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
