"""Output tokens to text: incremental detokenization and stop strings."""

from __future__ import annotations

from router.chat import Tokenizer


class TextStream:
    """Output tokens to text deltas: incremental detokenization, EOS dropped, stop strings applied
    on the decoded text (held back while they could still be forming)."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def add(self, token_ids: list[int]) -> None:
        eos = self.tokenizer.eos_token_id
        for token in token_ids:
            if token == eos or self.stopped:
                continue
            self._ids.append(token)
            decode = self.tokenizer.decode
            prefix = decode(self._ids[self._prefix_offset : self._read_offset])
            full = decode(self._ids[self._prefix_offset :])
            if len(full) > len(prefix) and not full.endswith("\ufffd"):
                self._append(full[len(prefix) :])
                self._prefix_offset = self._read_offset
                self._read_offset = len(self._ids)

    def _append(self, delta: str) -> None:
        start = max(0, len(self.text) - self.hold)
        self.text += delta
        if not self.stop:
            return
        hits = [pos for pos in (self.text.find(s, start) for s in self.stop) if pos >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def take(self, final: bool) -> str:
        """The text not sent yet, keeping back what could be the start of a stop string."""
        end = len(self.text) if final or self.stopped else max(self.sent, len(self.text) - self.hold)
        delta = self.text[self.sent : end]
        self.sent = end
        return delta
