"""Load that fits its target: the served model and its context length (`max_model_len` in
`GET /v1/models`, as vLLM and kvgate report it), and trace rows cut to that context.

Prompts are estimated from characters (`chars_per_token`), so the budget leaves a margin for the chat
template and the estimate's error.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import aiohttp
import msgspec
from msgspec.structs import replace

from loadgen.trace import TraceRow


class ServedModel(msgspec.Struct, frozen=True):
    name: str
    max_model_len: int | None = None  # None: the server did not say


class TraceFit(msgspec.Struct, frozen=True):
    rows: list[TraceRow]
    left_out: int  # rows whose prompt does not fit
    sessions_cut: int  # sessions that end before their first turn that does not fit


def context_budget(max_model_len: int) -> int:
    """Tokens a prompt and its reply may take together: the served context less a margin (64 tokens of
    chat template, and 1/32 for the error of estimating tokens from characters)."""
    return max(1, max_model_len - 64 - max_model_len // 32)


async def served_model(
    url: str, api_key: str | None, model: str | None = None, timeout_s: float = 10.0
) -> ServedModel:
    """The model to load (`model`, else the first one listed) and its context length. Without `model`
    a server that lists nothing is an error; with it, a missing list only leaves the length unknown."""
    base = url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as http,
            http.get(base + "/models", headers=headers) as response,
        ):
            body = await response.json(content_type=None)
            listed = body.get("data") if response.status == 200 and isinstance(body, dict) else None
    except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError) as exc:
        if model is not None:
            return ServedModel(model)
        raise ValueError(f"cannot list models at {base}/models ({exc}); pass --model") from exc
    entries = [m for m in listed or [] if isinstance(m, dict) and isinstance(m.get("id"), str)]
    if model is None:
        if not entries:
            raise ValueError(f"GET {base}/models listed no models; pass --model")
        model = str(entries[0]["id"])
    found = next((m for m in entries if m["id"] == model), {})
    length = found.get("max_model_len")
    return ServedModel(model, length if isinstance(length, int) and length > 0 else None)


def fit_trace(rows: Sequence[TraceRow], budget: int, chars_per_token: float = 1.0) -> TraceFit:
    """The rows whose prompt leaves room for a reply within `budget` tokens, each reply cut to fit. A
    replayed prompt has about `input_length` characters. A session ends before its first turn that does
    not fit (its later turns extend that prompt); a row without a session is left out alone."""

    def room(row: TraceRow) -> int:
        return budget - math.ceil(row.input_length / chars_per_token)

    first_misfit: dict[str, int] = {}  # session -> its first turn that does not fit
    for row in rows:
        if row.session_id is not None and room(row) < 1:
            first_misfit[row.session_id] = min(row.turn, first_misfit.get(row.session_id, row.turn))
    kept: list[TraceRow] = []
    for row in rows:  # in the file's order, which replay keeps for equal timestamps
        if row.session_id is None:
            fits = room(row) >= 1
        else:
            fits = row.turn < first_misfit.get(row.session_id, row.turn + 1)
        if fits:
            space = room(row)
            kept.append(row if row.output_length <= space else replace(row, output_length=space))
    return TraceFit(kept, len(rows) - len(kept), len(first_misfit))
