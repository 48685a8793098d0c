"""What one more prefill token adds to a first token's latency, fitted from the first tokens seen.

A worker's measured prefill speed (tokens / step time) is an average cost: a step has a fixed part (the
model's weights read once, the decodes it carries) that a short prompt pays almost alone, so 150 tokens
look ten times dearer per token than the 2,000 more that a missed document adds to the same step. Where
a request's choice is between a cached prefix on a busy worker and a miss on an idle one, the marginal
cost is the one that decides. Each first token is a sample: its latency from the pick against the
prefill tokens the worker had to compute before or with it (the router's own in-flight prefill there at
the pick, plus the request's uncached tokens); the slope of an exponentially weighted least-squares line
through them is the marginal cost. Until the samples spread over enough tokens to fix a slope there is
none (`ms_per_token` is None).
"""

from __future__ import annotations

# the samples' weight halves over about 700 first tokens: recent enough to follow the pool, long enough
# to hold the rare long misses of traffic that mostly hits
DECAY = 0.999
MIN_SAMPLES = 64
# the slope is only trusted once the tokens vary: a standard deviation of at least this many tokens
MIN_SPREAD_TOKENS = 64.0


class PrefillFit:
    __slots__ = ("_n", "_w", "_x", "_xx", "_xy", "_y", "ms_per_token")

    def __init__(self) -> None:
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        self._n = 0
        self.ms_per_token: float | None = None

    def observe(self, prefill_tokens: float, ttft_ms: float) -> None:
        d = DECAY
        self._w = d * self._w + 1.0
        self._x = d * self._x + prefill_tokens
        self._y = d * self._y + ttft_ms
        self._xx = d * self._xx + prefill_tokens * prefill_tokens
        self._xy = d * self._xy + prefill_tokens * ttft_ms
        self._n += 1
        if self._n < MIN_SAMPLES:
            return
        w = self._w
        mean_x = self._x / w
        var_x = self._xx / w - mean_x * mean_x
        if var_x < MIN_SPREAD_TOKENS * MIN_SPREAD_TOKENS:
            return  # the last slope stands (or none yet)
        slope = (self._xy / w - mean_x * self._y / w) / var_x
        self.ms_per_token = slope if slope > 0.0 else None
