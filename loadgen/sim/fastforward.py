"""Fast-forward through runs of pure decode steps: the simulator's one shortcut around `Engine.step`.

Between two "interesting" steps (one that admits, prefills, allocates a block, fills a block, or
finishes a sequence) an engine step does the same thing every time: each running sequence computes
one token in the block it already holds and samples the next placeholder token; the KV usage, and so
the modelled step time, stay constant; nothing is stored, evicted or admitted (the waiting queue's
head cannot be admitted because no block is freed). Such a run of k steps is taken as one event and
applied to the engine's sequences in one go. `tests/loadgen/test_sim_fastforward.py` checks that a
replay gives the same numbers with and without it.
"""

from __future__ import annotations

from engines.engine import Engine
from engines.mock import PLACEHOLDER_TEXT, MockRunner
from engines.runner import ScheduledChunk
from engines.sequence import Sequence


class DecodeRun:
    """A planned run of `steps` identical pure-decode steps of `duration` seconds each."""

    __slots__ = ("duration", "seqs", "speed_memo", "start", "steps")

    def __init__(self, start: float, duration: float, steps: int, seqs: list[Sequence]) -> None:
        self.start = start
        self.duration = duration
        self.steps = steps
        self.seqs = seqs
        # (speed before the run, steps, speed after them): each load report of a long run goes on
        # from the previous one instead of smoothing from the run's start again
        self.speed_memo: tuple[float, int, float] | None = None

    def end(self) -> float:
        return self.start + self.steps * self.duration

    def started_by(self, now: float) -> int:
        """Steps of the run that had started by `now` (the engine applies a step when it starts)."""
        if now < self.start:
            return 0
        return min(self.steps, int((now - self.start) / self.duration) + 1)


class FastForward:
    def __init__(self, engine: Engine, min_steps: int = 2) -> None:
        self.engine = engine
        self.min_steps = min_steps
        runner = engine.runner
        if not isinstance(runner, MockRunner):  # another runner samples other tokens than these
            raise TypeError(
                "fast-forward replays the mock runner's placeholder tokens: the engine must run one"
            )
        self._placeholder = runner.tokenizer.encode(PLACEHOLDER_TEXT)
        self._tiled = self._placeholder * 2  # the placeholder repeated: any run of it is one slice

    def plan(self, now: float) -> DecodeRun | None:
        """A run of pure decode steps starting now, or None when the next step is not one."""
        engine = self.engine
        sched = engine.scheduler
        running = sched.running
        if not running or engine.has_work() != sched.has_work():  # aborted outputs pending
            return None
        last = running[-1]  # the latest admitted: still prefilling, more often than not
        if len(last.token_ids) - last.num_computed_tokens != 1:
            return None
        block_size = engine.config.block_size
        steps = 1 << 30
        for seq in running:
            # the sequence's properties, inline: this runs for every running sequence before each step
            length = len(seq.token_ids)
            computed = seq.num_computed_tokens
            output = length - seq.num_prompt_tokens
            if length - computed != 1 or output < 1:
                return None
            # stay inside the last block held, and stop short of filling it (a fill is a commit)
            steps = min(
                steps,
                len(seq.block_table) * block_size - computed - 1,
                seq.sampling.max_tokens - output - 1,  # the finishing step is real
            )
            if not seq.sampling.ignore_eos and seq.sampling.stop_token_ids:
                return None
            if steps < self.min_steps:
                return None
        if len(running) > sched.max_num_batched_tokens:
            return None
        if sched.waiting and self._admissible(sched.waiting[0]):
            return None
        # the step as the engine would hand it to the runner (the mock times a decode by the sampling
        # sequences' block tables, which stay put through the run)
        chunks = [
            ScheduledChunk(s.seq_id, [], len(s.token_ids) - 1, s.block_table, True, s.sampling, 1, 1)
            for s in running
        ]
        duration = engine.runner.step_time_s(chunks, engine.block_manager.usage())
        if duration is None or duration <= 0:
            return None
        return DecodeRun(now, duration, steps, list(running))

    def _admissible(self, seq: Sequence) -> bool:
        sched = self.engine.scheduler
        bm = self.engine.block_manager
        if len(sched.running) >= sched.max_num_seqs:
            return False
        if bm.blocks_needed(len(seq)) > bm.num_blocks:
            return True  # the scheduler will drop it: a real step
        return bm.can_allocate(seq, bm.match_prefix(seq)) or bool(
            (sched.preempt_for_prompts or sched.priority_threshold is not None) and sched.decodes_to_preempt()
        )

    def apply(self, run: DecodeRun, steps: int) -> None:
        """Apply the first `steps` steps of `run` to the engine, as `steps` calls of step() would."""
        if steps <= 0:
            return
        placeholder = self._placeholder
        size = len(placeholder)
        tiled = self._tiled
        if len(tiled) < size + steps:
            tiled = self._tiled = placeholder * (steps // size + 2)
        for seq in run.seqs:
            # token i of the answer is placeholder[i % size], as the mock runner samples it
            start = (seq.num_output_tokens + seq.sampling.output_offset) % size
            seq.token_ids += tiled[start : start + steps]
            seq.num_computed_tokens += steps
        engine = self.engine
        engine.num_steps += steps
        engine.decode_tok_s = self.decode_speed_after(run, steps)

    def decode_speed_after(self, run: DecodeRun, steps: int) -> float:
        """The engine's smoothed decode speed after `steps` steps of the run (its own update rule)."""
        engine = self.engine
        a = engine.SPEED_SMOOTHING
        speed = len(run.seqs) / run.duration
        start = value = engine.decode_tok_s
        done = 0
        memo = run.speed_memo
        if memo is not None and memo[0] == start and memo[1] <= steps:
            done, value = memo[1], memo[2]  # the same float steps, taken already
        for _ in range(steps - done):
            value = speed if not value else (1 - a) * value + a * speed
        run.speed_memo = (start, steps, value)
        return value
