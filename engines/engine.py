"""The engine: requests in, one step at a time, outputs and KV cache events out.

Synchronous and clock-agnostic: the worker drives it from an asyncio task (the torch runner in a
thread), the simulator drives it in virtual time with the mock runner. The step path does no I/O.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from operator import attrgetter

import msgspec

from engines.block_manager import BlockManager
from engines.onboarding import DEFAULT_ONBOARDING, ONBOARDING_FORMS, Onboarding
from engines.runner import ModelRunner, SamplingParams, ScheduledChunk, TieredModelRunner
from engines.scheduler import Scheduler
from engines.sequence import Sequence, SequenceStatus
from router.hashing import DEFAULT_BLOCK_SIZE, hash_seed
from router.protocol import CachedBlock, KvEvent, LoadReport

_token_ids = attrgetter("token_ids")
_computed = attrgetter("num_computed_tokens")
_NO_TOKENS: list[int] = []  # a chunk's tokens for a runner that does not read them (never written)


# A prefetch copies this many blocks per step (43 ms over the default host link, a step's order of
# time): arrivals wait for one chunk, as a GPU's copy engine interleaves transfers in chunks.
PREFETCH_CHUNK_BLOCKS = 256


class EngineConfig(msgspec.Struct, frozen=True):
    num_blocks: int = 1024
    block_size: int = DEFAULT_BLOCK_SIZE
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_pinned_blocks: int | None = None  # default: half the blocks
    host_blocks: int = 0  # the host tier's blocks (0: no host tier)
    preempt_for_prompts: bool = False  # a prompt that does not fit preempts decodes (engines/scheduler.py)
    # order the queue by each request's priority and let a request that does not fit preempt running
    # ones it outranks by more than `priority_threshold`, as SGLang's --enable-priority-scheduling
    priority_scheduling: bool = False
    priority_threshold: int = 10  # SGLang's --priority-scheduling-preemption-threshold default
    # how a step waits for the host blocks it onboards (engines/onboarding.py): asynchronously by
    # default, as vLLM v1's offloading connector loads them
    onboarding: Onboarding = DEFAULT_ONBOARDING
    hash_seed: int = hash_seed()  # base seed for requests without a cache salt


class EngineRequest(msgspec.Struct):
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams = SamplingParams()
    session_id: str | None = None
    cache_salt: str | None = None  # tenant isolation: changes the block hash seed
    # the chained hashes of the prompt's leading full blocks when the caller has them already (the
    # simulator, from its trace); trusted as given, the rest are computed from the tokens
    prompt_block_hashes: list[int] | None = None
    priority: int = 0  # larger goes first, when the engine schedules by priority


class RequestOutput(msgspec.Struct):
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort"
    num_cached_tokens: int
    prompt_tokens: int
    completion_tokens: int
    num_host_cached_tokens: int = 0  # of the cached ones, those onboarded from the host tier


class StepResult(msgspec.Struct):
    outputs: list[RequestOutput]
    duration_s: float  # modelled by the runner when it can (mock), else measured
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    # the outputs leave this long before the step's end (the mock's decode pass; 0: at its end)
    output_lead_s: float = 0.0


class EngineLoad(msgspec.Struct):
    running: int
    waiting: int
    active_prefill_tokens: int
    used_blocks: int
    total_blocks: int
    prefill_tok_s: float
    decode_tok_s: float
    host_blocks: int = 0  # the host tier's capacity (0: none)
    host_block_ms: float = 0.0  # a block's copy from the host onto the device (0: unknown)
    onboard_async: bool = False  # those copies keep only their request waiting, not the step

    def report(self, worker_id: str, ts: float, decode_tok_s: float | None = None) -> LoadReport:
        """This load as the worker publishes it; `decode_tok_s` overrides the measured decode speed."""
        return LoadReport(
            worker_id,
            ts,
            self.running,
            self.waiting,
            self.active_prefill_tokens,
            self.used_blocks,
            self.total_blocks,
            self.prefill_tok_s,
            self.decode_tok_s if decode_tok_s is None else decode_tok_s,
            self.host_blocks,
            self.host_block_ms,
            onboard_async=self.onboard_async,
        )


def _copier(config: EngineConfig, runner: ModelRunner) -> TieredModelRunner | None:
    """The runner as the copier of a host tier, when the config has one; ValueError for settings that
    cannot work together."""
    if config.onboarding not in ONBOARDING_FORMS:  # a Struct built in code is not validated
        raise ValueError(f"onboarding {config.onboarding!r}: expected one of {', '.join(ONBOARDING_FORMS)}")
    if not config.host_blocks:
        return None
    if not isinstance(runner, TieredModelRunner):
        raise ValueError("a host tier needs a runner that copies blocks (copy_blocks)")
    return runner


class Engine:
    SPEED_SMOOTHING = 0.2  # weight of the newest step in the measured speeds

    def __init__(
        self,
        config: EngineConfig,
        runner: ModelRunner,
        clock: Callable[[], float] = time.monotonic,
        on_kv_events: Callable[[list[KvEvent]], None] | None = None,
    ) -> None:
        if runner.block_size != config.block_size or runner.num_blocks < config.num_blocks:
            raise ValueError("the runner's KV cache does not match the engine config")
        self.config = config
        self.runner = runner
        self.clock = clock
        self.on_kv_events = on_kv_events
        self._copier = _copier(config, runner)  # the runner, when a host tier needs its copies
        # what a host hit costs instead of a prefill, announced in the load report (the router prices
        # it): a runner that models its copies knows it, a real one measures it at startup
        self._host_block_ms = self._copier.host_block_ms if self._copier else 0.0
        self._num_layers = self._copier.num_layers if self._copier else 1
        # only a runner that models its copies leaves them to their sequences; a real one's step waits
        # for them whatever the form (the compute waits on the copy stream), so a torch worker loads
        # them in the step that admits the request (no step lost) and announces copies that stall it
        self._loads_async = (
            config.onboarding == "async" and self._copier is not None and runner.models_step_time
        )
        self.block_manager = BlockManager(
            config.num_blocks, config.block_size, clock, config.max_pinned_blocks, config.host_blocks
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            config.preempt_for_prompts,
            config.priority_threshold if config.priority_scheduling else None,
            self._loads_async,
        )
        self._link_free_at = 0.0  # asynchronous onboarding: when the host link is free again
        self._seqs: dict[str, Sequence] = {}
        self._finished_early: list[RequestOutput] = []  # aborted or refused between steps
        self.prefetched_blocks = 0  # brought back from the host ahead of a turn (`prefetch`), all time
        self.max_model_len = config.num_blocks * config.block_size
        runner_limit = getattr(runner, "max_model_len", None)  # positions the model can encode
        if runner_limit:
            self.max_model_len = min(self.max_model_len, runner_limit)
        self._token_values = getattr(runner, "reads_token_ids", True)
        self.prefill_tok_s = 0.0
        self.decode_tok_s = 0.0
        self.num_steps = 0

    # --- requests

    def add_request(self, request: EngineRequest, *, adopt_prompt: bool = False) -> None:
        """Queue a request. `adopt_prompt`: the caller hands its `prompt_token_ids` list over (it does
        not use it again): the sequence extends that list instead of a copy of it."""
        tokens = request.prompt_token_ids
        if not tokens:
            raise ValueError("the prompt is empty")
        if len(tokens) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(tokens)} tokens; this worker holds at most {self.max_model_len - 1}"
            )
        if request.request_id in self._seqs:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        if request.sampling.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        seed = hash_seed(None, request.cache_salt) if request.cache_salt else self.config.hash_seed
        known = request.prompt_block_hashes
        hashes = list(known[: len(tokens) // self.config.block_size]) if known else []
        seq = Sequence(
            request.request_id,
            tokens,
            request.sampling,
            self.config.block_size,
            seed,
            hashes,
            request.session_id,
            copy_prompt=not adopt_prompt,
            priority=request.priority,
        )
        self._seqs[request.request_id] = seq
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, "abort")
        self._finished_early.append(self._output(seq, []))
        return True

    def was_scheduled(self, request_id: str) -> bool:
        """Whether a step has taken the request in (its prefix looked up, blocks given), or it left."""
        seq = self._seqs.get(request_id)
        return seq is None or seq.num_cached_tokens >= 0

    def has_work(self) -> bool:
        return self.scheduler.has_work() or bool(self._finished_early)

    def pin(self, session_id: str, block_hashes: list[int], ttl_s: float, host_ttl_s: float = 0.0) -> int:
        """Pin a session's blocks on the device for `ttl_s`, and keep them on the host tier (if any)
        for `host_ttl_s` (0: leave the session's keep as it is)."""
        if host_ttl_s > 0:
            self.block_manager.keep_on_host(session_id, block_hashes, host_ttl_s)
        return self.block_manager.pin(session_id, block_hashes, ttl_s)

    def prefetch(self, block_hashes: list[int], limit: int | None = None) -> float:
        """Bring these blocks (at most `limit`) back from the host tier ahead of their turn
        (`BlockManager.prefetch`), the copies now, between steps; returns their modelled seconds (0 when
        real or none)."""
        self.prefetched_blocks += self.block_manager.prefetch(block_hashes, limit)
        copy_s = self._run_copies() or 0.0
        self._emit_events()
        return copy_s

    def offload(self, block_hashes: list[int]) -> int:
        """Move these blocks, where free on the device, to the host tier (`BlockManager.offload`), the
        copies now, between steps (a later step may reuse the blocks); returns how many moved."""
        moved = self.block_manager.offload(block_hashes)
        self._run_copies()
        self._emit_events()
        return moved

    def cached_blocks(self) -> list[CachedBlock]:
        return self.block_manager.cached_blocks()

    @property
    def has_host_tier(self) -> bool:
        return self.block_manager.host is not None

    # --- the step

    def step(self) -> StepResult:
        outputs, self._finished_early = self._finished_early, []
        scheduled, too_long = self.scheduler.schedule(self.clock())
        for seq in too_long:
            del self._seqs[seq.seq_id]
            outputs.append(self._output(seq, []))
        if not scheduled:
            return self._idle_step(outputs)
        chunks, num_prefill, num_decode = self._chunks(scheduled)
        kv_usage = self.block_manager.usage()
        started = time.perf_counter()
        copy_s = self._run_copies()
        if self.scheduler.loading:  # the copies are theirs: they wait for them, this step does not
            self._start_loads(copy_s)
            copy_s = None
        sampled = self.runner.execute(chunks)
        duration = self.runner.step_time_s(chunks, kv_usage)
        if duration is None:
            duration = time.perf_counter() - started
        # the sampling sequences and their blocks, before the finished ones free them
        sampling = [
            (seq, len(c.block_table)) for (seq, _), c in zip(scheduled, chunks, strict=True) if c.sample
        ]
        self._after_step(scheduled, sampled, outputs)
        lead = 0.0
        if self.runner.models_step_time:
            duration, lead = self._decode_pass(duration, sampling)
            if copy_s:
                duration = self._with_copies(duration, copy_s)  # modelled: the step waits for its onboards
        self._measure(num_prefill, num_decode, duration)
        self._emit_events()
        self.num_steps += 1
        return StepResult(outputs, duration, num_prefill, num_decode, lead)

    def _decode_pass(self, duration: float, sampling: list[tuple[Sequence, int]]) -> tuple[float, float]:
        """A modelled step's time and its outputs' lead (engines/mock.py): the decode pass after the
        outputs leave is that of the sequences still decoding, none where every one that sampled
        finished here (as Dynamo's mocker, which then starts its next pass at once)."""
        if not sampling:
            return duration, 0.0
        whole = self.runner.decode_pass_s(sum(blocks for _, blocks in sampling))
        continuing = [blocks for seq, blocks in sampling if seq.status is not SequenceStatus.FINISHED]
        if len(continuing) == len(sampling):  # the usual step: its time is the runner's as it stands
            return duration, whole
        lead = self.runner.decode_pass_s(sum(continuing)) if continuing else 0.0
        return duration - whole + lead, lead

    def _idle_step(self, outputs: list[RequestOutput]) -> StepResult:
        """A step that computes nothing: the copies asked for between steps (an offload), or those of
        sequences admitted to wait for their onboarded blocks, and the outputs of those that left."""
        copy_s = self._run_copies()
        if self.scheduler.loading:
            self._start_loads(copy_s)
            copy_s = 0.0
        self._emit_events()
        return StepResult(outputs, copy_s or 0.0)

    def _chunks(self, scheduled: list[tuple[Sequence, int]]) -> tuple[list[ScheduledChunk], int, int]:
        """The runner's chunk of each scheduled sequence, and the step's prefill and decode tokens."""
        chunks = []
        num_prefill = num_decode = 0
        values = self._token_values
        for seq, n in scheduled:
            # the sequence's properties, inline: every scheduled sequence, every step
            tokens = seq.token_ids
            start = seq.num_computed_tokens
            end = start + n
            output_len = len(tokens) - seq.num_prompt_tokens
            if n == 1 and output_len:
                num_decode += 1
            else:
                num_prefill += n
            chunks.append(
                ScheduledChunk(
                    seq.seq_id,
                    tokens[start:end] if values else _NO_TOKENS,
                    start,
                    seq.block_table,
                    end == len(tokens),
                    seq.sampling,
                    output_len,
                    n,
                )
            )
        return chunks, num_prefill, num_decode

    def _with_copies(self, compute_s: float, copy_s: float) -> float:
        """A step's time with its onboarding copies: after them (their sum), or, layer-wise, layer i's
        compute after layer i's copy and beside layer i + 1's: L layers of copy c / L and compute p / L
        take c / L + (L - 1) x max(c, p) / L + p / L = max(c, p) + min(c, p) / L."""
        if self.config.onboarding != "layerwise":
            return compute_s + copy_s
        longer, shorter = (compute_s, copy_s) if compute_s > copy_s else (copy_s, compute_s)
        return longer + shorter / self._num_layers

    def _start_loads(self, copy_s: float | None) -> None:
        """The sequences admitted to wait for their onboarded blocks: ready when this step's copies
        have crossed the host link, after those already on it (at once when the copies were real)."""
        now = self.clock()
        start = self._link_free_at if self._link_free_at > now else now
        self._link_free_at = ready = start + (copy_s or 0.0)
        for seq in self.scheduler.loading:
            seq.ready_at = ready
        self.scheduler.loading.clear()

    def next_ready_at(self) -> float | None:
        """The earliest time a running sequence's onboarded blocks land, if any is still waiting."""
        now = self.clock()
        waits = [s.ready_at for s in self.scheduler.running if s.ready_at > now]
        return min(waits) if waits else None

    def _run_copies(self) -> float | None:
        """The host tier's copies the scheduler decided; their modelled seconds, if modelled."""
        bm = self.block_manager
        if bm.host is None or self._copier is None:
            return None
        copies = bm.take_copies()
        if not copies:
            return None
        return self._copier.copy_blocks(copies.offloads, copies.onboards)

    def _after_step(
        self, scheduled: list[tuple[Sequence, int]], sampled: list[int | None], outputs: list[RequestOutput]
    ) -> None:
        bm = self.block_manager
        block_size = bm.block_size
        max_len = self.max_model_len
        for (seq, n), token in zip(scheduled, sampled, strict=True):
            seq.num_computed_tokens += n
            if seq.num_computed_tokens // block_size > seq.num_committed_blocks:
                bm.commit(seq)
            if token is None:
                continue
            tokens = seq.token_ids
            tokens.append(token)
            # the finish check and the output of a running sequence, inline: every sequence, every step
            params = seq.sampling
            num_output = len(tokens) - seq.num_prompt_tokens
            if not params.ignore_eos and token in params.stop_token_ids:
                reason = "stop"
            elif num_output >= params.max_tokens or len(tokens) >= max_len:
                reason = "length"
            else:
                outputs.append(
                    RequestOutput(
                        seq.seq_id,
                        [token],
                        False,
                        None,
                        max(seq.num_cached_tokens, 0),
                        seq.num_prompt_tokens,
                        num_output,
                        seq.num_host_cached_tokens,
                    )
                )
                continue
            self.scheduler.finish(seq, reason)
            del self._seqs[seq.seq_id]
            outputs.append(self._output(seq, [token]))

    def _output(self, seq: Sequence, new_tokens: list[int]) -> RequestOutput:
        finished = seq.status is SequenceStatus.FINISHED
        return RequestOutput(
            seq.seq_id,
            new_tokens,
            finished,
            seq.finish_reason if finished else None,
            max(seq.num_cached_tokens, 0),
            seq.num_prompt_tokens,
            seq.num_output_tokens,
            seq.num_host_cached_tokens,
        )

    def _measure(self, num_prefill: int, num_decode: int, duration: float) -> None:
        if duration <= 0:
            return
        a = self.SPEED_SMOOTHING
        if num_prefill:
            speed = num_prefill / duration
            self.prefill_tok_s = speed if not self.prefill_tok_s else (1 - a) * self.prefill_tok_s + a * speed
        if num_decode:
            speed = num_decode / duration
            self.decode_tok_s = speed if not self.decode_tok_s else (1 - a) * self.decode_tok_s + a * speed

    def _emit_events(self) -> None:
        if self.block_manager.has_events:
            events = self.block_manager.take_events()
            if self.on_kv_events is not None:
                self.on_kv_events(events)

    # --- load

    def load(self) -> EngineLoad:
        sched = self.scheduler
        waiting = sched.waiting
        # every waiting sequence's pending tokens, summed in C loops (a long queue under pressure)
        active_prefill = sum(map(len, map(_token_ids, waiting))) - sum(map(_computed, waiting))
        for s in sched.running:
            pending = len(s.token_ids) - s.num_computed_tokens
            if pending > 1:
                active_prefill += pending
        bm = self.block_manager
        return EngineLoad(
            len(sched.running),
            len(sched.waiting),
            active_prefill,
            bm.num_used,
            bm.num_blocks,
            self.prefill_tok_s,
            self.decode_tok_s,
            bm.host.num_blocks if bm.host is not None else 0,
            self._host_block_ms,
            self._loads_async,
        )
