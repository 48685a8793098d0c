"""A streamed answer's server-sent events, as OpenAI's chat and completions APIs write them.

Chat: a first chunk with the role, then text deltas; completions: text chunks. With vLLM's
`return_token_ids`, the prompt's ids go on the first chunk (chat: the role chunk; completions: the
first chunk sent) and each chunk's choice carries the output ids since the last chunk.
"""

from __future__ import annotations

import json
import time
from typing import Any


class AnswerChunks:
    def __init__(
        self,
        response_id: str,
        kind: str,
        chat: bool,
        model: str,
        include_usage: bool,
        token_ids: list[int] | None,
        prompt_token_ids: list[int],
    ) -> None:
        """`token_ids`: the output's ids as they grow (the request asked for them), else None."""
        self._chat = chat
        self._head = {
            "id": response_id,
            "object": f"{kind}.chunk" if chat else kind,
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": None,
        }
        self._usage_field: dict[str, Any] = {"usage": None} if include_usage else {}
        self._ids = token_ids
        self._sent_ids = 0  # of `_ids`, those sent in a chunk already
        self._prompt_ids: dict[str, Any] = (
            {"prompt_token_ids": prompt_token_ids} if token_ids is not None else {}
        )

    def role(self) -> bytes:
        """Chat's first chunk: the assistant's role, no text yet."""
        return self._chunk([self._choice("", None, first=True)], **self._prompt_ids)

    def text(self, text: str, finish_reason: str | None) -> bytes:
        # completions have no role chunk: the prompt's ids go on the first chunk sent
        extra = self._prompt_ids if not self._chat and self._ids is not None and self._sent_ids == 0 else {}
        return self._chunk([self._choice(text, finish_reason)], **extra)

    def usage(self, usage: dict[str, Any]) -> bytes:
        """The usage chunk a client asked for with `stream_options.include_usage`: no choices."""
        return self._chunk([], usage=usage)

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> bytes:
        body = {**self._head, "choices": choices, **self._usage_field, **extra}
        return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"

    def _choice(self, text: str, finish_reason: str | None, first: bool = False) -> dict[str, Any]:
        if not self._chat:
            body = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        else:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if first else {}
            if text and not first:
                delta["content"] = text
            body = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        ids = self._ids
        if ids is not None:  # vLLM's `return_token_ids`: the ids since the last chunk
            body["token_ids"] = ids[self._sent_ids :]
            self._sent_ids = len(ids)
        return body
