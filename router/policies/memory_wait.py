"""The wait for device memory: how long a prompt would queue on a worker before its blocks fit.

An engine admits its queue first come, first served, each prompt once its blocks fit in those no running
request holds (cached blocks nobody uses are free: it evicts them). A running request holds its blocks,
one more every `block_size` tokens it decodes, until it completes. So a prompt that does not fit beside
the running requests waits for the earliest completions that free enough: their remaining decodes, not
the prefill of the blocks over capacity. Measured against the simulator's TTFT in docs/EXPERIMENTS.md
("Live, fourth pass"): within 15 % through a jam, and a predicted zero never waited 2 s.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import pairwise

from router.load import InFlight, WorkerLoad
from router.prefix_match import common_prefix


def _shared_prefixes(chains: list[Sequence[int]]) -> dict[int, int]:
    """For each chain (by identity), the longest prefix it shares with another of `chains`: blocks its
    request's completion leaves in use. In sorted order a chain's longest shared prefix is with a
    neighbour, whatever the order of the hashes."""
    shared: dict[int, int] = {}
    for a, b in pairwise(sorted(chains, key=list)):
        n = common_prefix(a, b)
        if n:
            shared[id(a)] = max(shared.get(id(a), 0), n)
            shared[id(b)] = max(shared.get(id(b), 0), n)
    return shared


class _Flights:
    """The requests in flight on a worker, as the wait needs them."""

    __slots__ = ("chains", "decoding", "outputs", "preempted", "preempted_n", "queued", "since")

    def __init__(
        self, wl: WorkerLoad, flights: Iterable[tuple[InFlight, Sequence[int]]], now: float, step_s: float
    ) -> None:
        self.chains: list[Sequence[int]] = []
        self.decoding: list[tuple[float, int, Sequence[int]]] = []  # (completes at, its blocks, its chain)
        self.queued: list[tuple[float, Sequence[int]]] = []  # (picked at, chain) of those still prefilling
        self.since = 0  # of which routed there after the worker's report
        self.preempted = 0  # blocks of the decodes the worker preempted: queued first, holding none
        self.preempted_n = 0  # how many
        self.outputs = 0
        for f, other in flights:
            self.chains.append(other)
            self.outputs += f.output_tokens
            if f.preempted:
                self.preempted += f.blocks
                self.preempted_n += 1
            elif f.prefilling:
                self.queued.append((f.picked_at, other))
                self.since += f.epoch == wl.epoch
            else:
                began = f.first_token_at if f.first_token_at is not None else f.picked_at
                left = f.output_tokens - (now - began) / step_s
                self.decoding.append((now + (left if left > 0.0 else 0.0) * step_s, f.blocks, other))


def memory_wait_ms(
    wl: WorkerLoad,
    chain: Sequence[int],
    flights: Iterable[tuple[InFlight, Sequence[int]]],
    now: float,
    step_s: float,
    block_size: int,
    in_prefill: int = 0,
) -> float:
    """How long a prompt of blocks `chain` would wait on this worker for device memory (ms); 0 when it
    fits now (`MemoryWait`, for one prompt)."""
    return MemoryWait(wl, flights, now, step_s, block_size, in_prefill).ms(chain)


class MemoryWait:
    """The wait for device memory on one worker of any prompt: its flights walked once, for the prompts
    of a pass over the picks held for it (router/memory_hold.py) as for one.

    `wl` must hold a fresh load report; `flights`: the router's requests in flight on the worker with
    their chains; `step_s`: seconds between two tokens of a decode there; `in_prefill`: the blocks the
    prompts admitted and still in chunked prefill will take beyond those the report counts.

    Wanted: the blocks in use (the report, plus `in_prefill`), those of the requests queued ahead (the
    decodes the worker preempted, at the head of its queue; the newest of those still prefilling, as
    many more as the report says wait plus those routed there since) and this prompt's (its full blocks
    and one more, for its partial last block or its first output token: the engine's admission counts
    ceil(tokens / block size)), less the prefixes requests there hold already (a system prompt they
    share).
    Beyond the worker's blocks the prompt waits until completions free the excess and what the decodes
    grow meanwhile: a decoding request completes when its output tokens (its max_tokens) run out, at
    the worker's decode pace. Past the last of them, the worker frees its blocks once per decode of a
    turn."""

    __slots__ = ("_base", "_capacity", "_chains", "_frees", "_now", "_tail_s", "_turn_s")

    def __init__(
        self,
        wl: WorkerLoad,
        flights: Iterable[tuple[InFlight, Sequence[int]]],
        now: float,
        step_s: float,
        block_size: int,
        in_prefill: int = 0,
    ) -> None:
        report = wl.report
        self._chains: list[Sequence[int]] | None = None  # None: no wait predicted (no report, no pace)
        if report is None or not report.total_blocks or step_s <= 0.0:
            return
        there = _Flights(wl, flights, now, step_s)
        chains = self._chains = there.chains
        shared = _shared_prefixes(chains)
        queued = sorted(there.queued, key=lambda q: q[0])
        # (the decodes the worker preempted wait there too, first: the rest of its waiting are prompts)
        waiting = max(0, report.waiting - there.preempted_n)
        ahead = queued[len(queued) - min(len(queued), there.since + waiting) :]
        # the excess before this prompt's own blocks (less those held there already)
        base = report.used_blocks + in_prefill - report.total_blocks + there.preempted
        self._base = base + sum(len(other) - shared.get(id(other), 0) for _, other in ahead)
        self._capacity = report.total_blocks
        self._now = now
        # per completion, oldest first: when, the blocks freed by then, and what the decodes still
        # running grew until then (a block every `block_size` tokens)
        decoding = sorted(there.decoding, key=lambda d: d[0])
        frees: list[tuple[float, float, float]] = []
        freed = grown = 0.0
        for k, (done_at, blocks, other) in enumerate(decoding):
            freed += blocks - shared.get(id(other), 0)  # blocks another request there holds stay in use
            grown = sum(min(done_at, later) - now for later, _, _ in decoding[k + 1 :]) / step_s / block_size
            frees.append((done_at, freed, grown))
        self._frees = frees
        # the rest waits for requests admitted after these: the worker's blocks free once per turn's decode
        last = decoding[-1][0] if decoding else now
        self._tail_s = last - now
        self._turn_s = step_s * there.outputs / len(chains) if chains else 0.0

    def ms(self, chain: Sequence[int]) -> float:
        """How long a prompt of blocks `chain` would wait here (ms); 0 when it fits now."""
        chains = self._chains
        if chains is None:
            return 0.0
        held = max((common_prefix(other, chain) for other in chains), default=0)
        # (+1: its partial last block, or its first output token's; a prompt sent one block short
        # waits in the engine's queue for a whole decode to end)
        excess = self._base + len(chain) + 1 - held
        if excess <= 0:
            return 0.0
        now = self._now
        freed = grown = 0.0
        for done_at, freed, grown in self._frees:
            if freed >= excess + grown:
                return (done_at - now) * 1000.0
        return (self._tail_s + self._turn_s * (excess + grown - freed) / self._capacity) * 1000.0
