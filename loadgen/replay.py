"""Trace replay: rows of the shared trace format turned into sessions.

Rows without a session are sent open-loop at their timestamp. Rows with a session are replayed
closed-loop: turn 0 at its timestamp, every later turn `delay_ms` after the previous turn of the same
session completed (capped by `max_think_s`), so a slow server slows the agents down as it would in
reality. `rate_scale` compresses trace time (2 = twice as fast), delays included.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence

from loadgen.trace import TraceContent, TraceRow
from loadgen.workloads import Session, SingleTurn, Turn


class ReplayText:
    """`TraceContent.prompt_text` with the text of each hash id memoised (agent prompts repeat
    hundreds of ids turn after turn), padded to `input_length`."""

    def __init__(self, content: TraceContent) -> None:
        self._content = content
        self._by_id: dict[int, str] = {}

    def prompt(self, row: TraceRow) -> str:
        parts = []
        for hash_id in self._content.ids_needed(row):
            text = self._by_id.get(hash_id)
            if text is None:
                text = self._by_id[hash_id] = self._content.text_for_id(hash_id)
            parts.append(text)
        text = "".join(parts)
        if len(text) < row.input_length:
            # ~13% of the Claude Code rows have fewer ids than input_length needs: pad deterministically
            # (the tail is private to the row anyway) so the request has the trace's length
            pad_id = -1 - (row.hash_ids[-1] if row.hash_ids else 0)
            while len(text) < row.input_length:
                text += self._content.text_for_id(pad_id)
                pad_id -= 1_000_003
        return text[: row.input_length]


class TraceSession:
    """The rows of one trace session, in turn order; the prompt of each comes from its hash ids (the
    trace fixes the whole prompt, so the model's actual reply is not appended)."""

    def __init__(
        self, session_id: str, rows: list[TraceRow], text: ReplayText, max_think_s: float, rate_scale: float
    ) -> None:
        self.session_id = session_id
        self.label = "trace"
        self._rows = rows
        self._text = text
        self._max_think_s = max_think_s
        self._rate_scale = rate_scale
        self._next = 0

    def next_turn(self, reply: str | None) -> Turn | None:
        if self._next >= len(self._rows):
            return None
        row = self._rows[self._next]
        previous = self._rows[self._next - 1] if self._next else None
        self._next += 1
        return Turn(
            messages=[{"role": "user", "content": self._text.prompt(row)}],
            max_tokens=max(1, row.output_length),
            tool_result=previous is not None and previous.stop == "tool_use",
            delay_s=0.0 if previous is None else think_delay_s(row, self._max_think_s, self._rate_scale),
        )


def think_delay_s(row: TraceRow, max_think_s: float, rate_scale: float) -> float:
    """The wait before a session row: its trace delay, compressed by `rate_scale`, capped."""
    return min(row.delay_ms / 1000.0 / rate_scale, max_think_s)


class TraceWorkload:
    name = "trace"

    def __init__(
        self,
        rows: Sequence[TraceRow],
        content: TraceContent,
        max_think_s: float = 60.0,
        rate_scale: float = 1.0,
    ) -> None:
        if rate_scale <= 0:
            raise ValueError("rate_scale must be positive")
        self.rows = rows
        self.max_think_s = max_think_s
        self.rate_scale = rate_scale
        self._text = ReplayText(content)

    def sessions(self) -> Iterator[tuple[float, Session]]:
        if not self.rows:
            return
        t0 = min(row.timestamp for row in self.rows)
        grouped: dict[str, list[TraceRow]] = defaultdict(list)
        first_index: dict[str, int] = {}
        # (arrival ms, row number in the file: ties keep file order and name single rows, item)
        arrivals: list[tuple[float, int, Session | TraceRow]] = []
        for index, row in enumerate(self.rows):
            if row.session_id is None:
                arrivals.append((row.timestamp, index, row))
            else:
                grouped[row.session_id].append(row)
                first_index.setdefault(row.session_id, index)
        for session_id, rows in grouped.items():
            rows.sort(key=lambda r: (r.turn, r.timestamp))
            session = TraceSession(session_id, rows, self._text, self.max_think_s, self.rate_scale)
            arrivals.append((rows[0].timestamp, first_index[session_id], session))
        arrivals.sort(key=lambda a: (a[0], a[1]))
        for timestamp, index, item in arrivals:
            if isinstance(item, TraceRow):  # built on demand: a long open-loop trace is megabytes of text
                turn = Turn(
                    messages=[{"role": "user", "content": self._text.prompt(item)}],
                    max_tokens=max(1, item.output_length),
                )
                item = SingleTurn(f"r{index:07d}", "trace", turn)
            yield (timestamp - t0) / 1000.0 / self.rate_scale, item
